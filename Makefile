# make demo: set up .venv, build tiny checkpoints, distill on 2 CPU processes.
# make test: set up .venv, run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO := demo_out

# Install only when requirements.txt is newer than the last install: a second run installs nothing.
$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

.PHONY: setup demo test clean
setup: $(INSTALLED)

$(DEMO)/ckpts/student/config.json: $(INSTALLED) tools/build_checkpoints.py
	$(PY) -m tools.build_checkpoints --out $(DEMO)/ckpts --arch llama

demo: $(DEMO)/ckpts/student/config.json
	rm -rf $(DEMO)/kd
	OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore $(VENV)/bin/torchrun --nproc_per_node=2 -m run --mode kd -c kd.yaml \
	  model.pretrained_model_name_or_path=$(DEMO)/ckpts/student model.anymodel_descriptor=llama \
	  teacher_model.pretrained_model_name_or_path=$(DEMO)/ckpts/teacher \
	  model.torch_dtype=float32 teacher_model.torch_dtype=float32 \
	  dataset.dataset_name=$(DEMO)/ckpts/data validation_dataset.dataset_name=$(DEMO)/ckpts/data \
	  step_scheduler.max_steps=20 step_scheduler.global_batch_size=8 step_scheduler.local_batch_size=4 \
	  step_scheduler.val_every_steps=10 step_scheduler.ckpt_every_steps=10 optimizer.lr=1e-3 \
	  checkpoint.checkpoint_dir=$(DEMO)/kd
	@echo "per-step log: $(DEMO)/kd/training.jsonl, validation: $(DEMO)/kd/validation.jsonl"

test: $(INSTALLED)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -p no:cacheprovider

clean:
	rm -rf $(DEMO)
