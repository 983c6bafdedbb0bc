"""Qwen3-VL-MoE (ModelOpt's ``qwen3_vl`` descriptor): distill its language model on text, vision tower frozen.

ModelOpt 0.47's ``qwen3_vl`` descriptor builds ``model_type: qwen3_vl_moe`` checkpoints, an image-text
model. Three things stand between it and this example's recipes, all handled here:

* **Build class.** AutoModel 0.7.0's ``NeMoAutoModelForCausalLM`` cannot build it ("Unrecognized
  configuration class"); ``NeMoAutoModelForImageTextToText`` can, and shares the very same
  ``from_pretrained``/``from_config``. ``patch_automodel`` keeps the config's ``_target_``
  (``NeMoAutoModelForCausalLM.from_pretrained``, so ``train_ft.build_model`` still hands the model its
  distributed setup) and builds with :meth:`Qwen3VL.build_class`'s class instead.
* **``anymodel_descriptor=auto``.** ModelOpt's auto-detection has no entry for ``qwen3_vl_moe``: the
  registry finds this architecture by its ``model_types``.
* **Vision tower.** The recipes feed text only, so the vision tower never gets a gradient; it is also
  frozen (``requires_grad=False``) with AutoModel's own ``freeze_config`` (``freeze_vision_tower``,
  which freezes ``model.visual``), unless the run's config sets a ``freeze_config`` of its own:
  :meth:`Qwen3VL.prepare_build_kwargs`.
* **Tensor parallelism.** AutoModel 0.7.0 has no TP plan for ``Qwen3VLMoeForConditionalGeneration`` and falls
  back to its Llama plan, whose ``model.layers.*`` keys name nothing in a model whose decoder is
  ``model.language_model.layers``. :func:`tp_plan` is AutoModel's Qwen3 plan moved under
  ``model.language_model``, with each MoE block split by whole experts (:class:`ShardExpertsByIndex`);
  :meth:`Qwen3VL.install` registers it, and ``tensor_parallel.per_layer_tp_plan`` specializes it layer by layer as for
  every AnyModel student.
* **Pipeline parallelism** stays refused: AutoModel 0.7.0 refuses image-text models outside its pipeline-aware
  list; preflight says so before any weights load (:meth:`Qwen3VL.parallelism_problem`).
"""

import copy

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from nemo_automodel.components.distributed import optimized_tp_plans
from nemo_automodel.components.distributed.tp_replicas import mark_tp_replica_gradient_reduction

from architectures.interface import DENSE_FIELDS, MOE_FIELDS, Architecture
from architectures.tensor_parallel import SEQUENCE_DIM, LocalParameters, SumGradientsOverTP

MODEL_TYPE = "qwen3_vl_moe"
DESCRIPTOR_NAME = "qwen3_vl"
# AutoModel's freeze policy: its legacy vision switch freezes the module named ``visual``.
FREEZE_VISION_TOWER = {"freeze_vision_tower": True}


def is_image_text(hf_config) -> bool:
    """A config transformers builds as an image-text model and not as a causal LM (Qwen3-VL)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = getattr(hf_config, "model_type", None)
    return (model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


# ----------------------------------------------------------------------------- tensor parallelism

MODEL_CLASS = "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeForConditionalGeneration"
LANGUAGE_MODEL = "model.language_model"


class ShardExpertsByIndex(ParallelStyle):
    """Tensor-parallel Qwen3-VL-MoE sparse MoE block (``Qwen3VLMoeTextSparseMoeBlock``): whole experts per rank.

    ``experts.gate_up_proj [E, 2I, hidden]`` (gate rows, then up rows) and ``experts.down_proj [E, hidden, I]``
    are ``Shard(0)``: rank ``r`` holds experts ``[r ceil(E/tp), ...)`` (an expert count that does not divide
    ``tp`` is split unevenly, e.g. 3 experts as 2 + 1). Splitting channels instead would separate each
    expert's gate rows from its up rows. The router (``gate``) stays whole: every rank routes every token
    the same way, runs the tokens routed to its own experts (the others get transformers' expert-parallel
    sentinel index, which every experts kernel skips in its expert-parallel mode) and produces a partial sum of the block's output;
    one all-reduce (a reduce-scatter under sequence parallelism) completes it. The router's gradient is
    then partial on each rank and is marked for ``synchronize_tp_replica_gradients`` to sum; the input's
    gradient is summed over the ranks in the backward pass, as a column-parallel layer's is.

    Args:
        sequence_parallel: The block's input arrives gathered and its output leaves as ``Shard(1)``
            (sequence), as AutoModel's Qwen SP plan does for ``down_proj``.
    """

    def __init__(self, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        experts, tp, rank = module.experts, device_mesh.size(), device_mesh.get_local_rank()
        num_experts = experts.gate_up_proj.shape[0]
        per_rank = -(-num_experts // tp)  # torch.chunk's split, which Shard(0) follows
        first, local = min(rank * per_rank, num_experts), max(0, min(per_rank, num_experts - rank * per_rank))
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(experts, name)
            experts.register_parameter(name, nn.Parameter(distribute_tensor(param, device_mesh, [Shard(0)])))
        LocalParameters(experts, {"gate_up_proj": lambda t: t, "down_proj": lambda t: t})
        # transformers' experts kernels skip (and zero) the tokens of a sentinel index only in this mode.
        experts._is_expert_parallel = True
        if local == 0:  # no expert on this rank: the eager loop skips every token, the grouped kernels cannot run
            experts.config = copy.copy(experts.config)
            experts.config._experts_implementation = "eager"

        def local_experts(mod, args):
            hidden, top_k_index, top_k_weights = args
            mod.num_experts = local
            index = top_k_index - first
            index = torch.where((index >= 0) & (index < local), index, torch.full_like(index, local))
            return hidden, index, top_k_weights

        def all_experts(mod, args, output):
            mod.num_experts = num_experts

        experts.register_forward_pre_hook(local_experts)
        experts.register_forward_hook(all_experts)
        mark_tp_replica_gradient_reduction(module.gate, "sum")
        group = device_mesh.get_group()

        def gather_input(mod, args):
            x = args[0].full_tensor() if isinstance(args[0], DTensor) else args[0]
            return (SumGradientsOverTP.apply(x, group), *args[1:])

        def reduce_output(mod, args, output):
            partial = DTensor.from_local(output, device_mesh, [Partial()], run_check=False)
            if self.sequence_parallel:
                return partial.redistribute(device_mesh, [Shard(SEQUENCE_DIM)])
            return partial.redistribute(device_mesh, [Replicate()]).to_local()

        module.register_forward_pre_hook(gather_input)
        module.register_forward_hook(reduce_output)
        return module


def tp_plan(model: nn.Module | None = None, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """Qwen3-VL-MoE's TP plan for its language model, with ``model.language_model.layers.*`` wildcards.

    AutoModel's Qwen3 plan (attention by heads, ``q_norm``/``k_norm`` whole with summed gradients, vocab-split
    embedding and ``lm_head``, the SP norms) with ``model.`` moved to ``model.language_model.``, and its dense
    MLP entries replaced by :class:`ShardExpertsByIndex`. The vision tower gets no entries (whole, frozen).
    """
    plan = {}
    for key, style in optimized_tp_plans._parallelize_qwen(None, sequence_parallel).items():
        if ".mlp." in key:
            continue
        plan[LANGUAGE_MODEL + key[len("model"):] if key.startswith("model.") else key] = style
    plan[LANGUAGE_MODEL + ".layers.*.mlp"] = ShardExpertsByIndex(sequence_parallel)
    return plan


class Qwen3VL(Architecture):
    """Qwen3-VL-MoE: built with AutoModel's image-text class, vision tower frozen, found by ``auto``, its TP
    plan registered with AutoModel, pipeline parallelism refused."""

    descriptor_names = (DESCRIPTOR_NAME,)
    model_types = (MODEL_TYPE,)
    applied_fields = DENSE_FIELDS | MOE_FIELDS
    config_wide_fields = {"ffn.moe.num_experts_per_tok": "num_experts_per_tok"}
    image_text = True

    def build_class(self, cls, hf_config):
        """AutoModel's image-text class, whose ``from_pretrained``/``from_config`` are ``cls``'s."""
        if not is_image_text(hf_config):
            return cls
        from nemo_automodel import NeMoAutoModelForImageTextToText

        return NeMoAutoModelForImageTextToText

    def prepare_build_kwargs(self, hf_config, kwargs: dict) -> None:
        """Freeze the vision tower of an image-text build, unless the caller passed a ``freeze_config``."""
        if is_image_text(hf_config) and kwargs.get("freeze_config") is None:
            kwargs["freeze_config"] = dict(FREEZE_VISION_TOWER)

    def parallelism_problem(self, section, descriptor_name, sizes):
        """Pipeline parallelism: AutoModel 0.7.0 refuses, at the build and after the process group is up, every
        image-text model outside its pipeline-aware list (gemma4, mistral3), Qwen3-VL-MoE among them."""
        pp_size = sizes["pp_size"]
        if pp_size == 1:
            return None
        return (f"distributed.pp_size={pp_size}: {section} is a Qwen3-VL-MoE ({MODEL_TYPE}) model, whose pipeline "
                "split AutoModel 0.7.0 refuses (it pipelines only the image-text models gemma4 and mistral3); set "
                "distributed.pp_size=1 and split it with FSDP2 and distributed.tp_size (sequence_parallel works too)")

    def install(self) -> None:
        """Register :func:`tp_plan` with AutoModel's optimized TP plans."""
        optimized_tp_plans.PARALLELIZE_FUNCTIONS.setdefault(MODEL_CLASS, tp_plan)

    def uninstall(self) -> None:
        if optimized_tp_plans.PARALLELIZE_FUNCTIONS.get(MODEL_CLASS) is tp_plan:
            del optimized_tp_plans.PARALLELIZE_FUNCTIONS[MODEL_CLASS]
