"""Nemotron-H configuration for the remote-code layout of NVIDIA's checkpoints (``auto_map``).

transformers 5.18's own ``NemotronHConfig`` already reads NVIDIA's config.json (``hybrid_override_pattern``,
``mamba_*`` aliases, legacy block-type names); this class is that config under the remote-code module
name, so ``AutoConfig.from_pretrained(..., trust_remote_code=True)`` and ModelOpt's
``force_cache_dynamic_modules`` find it where a Nemotron-H checkpoint from the hub keeps it.
"""

from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig as _NativeNemotronHConfig


class NemotronHConfig(_NativeNemotronHConfig):
    model_type = "nemotron_h"
