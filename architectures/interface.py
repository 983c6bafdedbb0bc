"""The one interface every architecture implements: what building, checking and splitting its models needs.

An architecture module subclasses :class:`Architecture`, overrides only what its models need, and is listed
once in ``registry.py``. ``patch_automodel``, preflight, the TP parallelizer and the tools ask the registry;
none of them imports an architecture module. The dense descriptors (Llama, Qwen2, Qwen3, Mistral-Small) are
:class:`Dense`: ModelOpt's descriptor as it is, AutoModel's build, AutoModel's TP plan split layer by layer.
"""

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from architectures.tensor_parallel import per_layer_tp_plan

# The block-config fields ModelOpt's dense descriptors turn into a different layer, and its MoE fields.
DENSE_FIELDS = frozenset({"attention.no_op", "attention.num_key_value_heads", "ffn.no_op", "ffn.intermediate_size"})
MOE_FIELDS = frozenset({"ffn.moe.num_local_experts", "ffn.moe.num_experts_per_tok", "ffn.moe.expert_intermediate_dim"})
# Models with Llama's layer names and blocks that AutoModel gives transformers' own TP plan, which has no
# sequence-parallel entries (sequence_parallel=true would be ignored): they get AutoModel's Llama plan.
LLAMA_LAYOUT = ("MistralForCausalLM",)


class Architecture:
    """One family of ModelOpt descriptors. The defaults change nothing; each hook says when it is called.

    Attributes:
        descriptor_names: The ModelOpt descriptor names it serves (``anymodel_descriptor``).
        model_types: The ``config.json`` ``model_type`` values it builds, where it needs to be found by them
            (``auto`` detection ModelOpt lacks, refusals, image-text builds).
        applied_fields: Block-config fields its descriptor turns into a different layer (dotted, e.g.
            ``ffn.intermediate_size``); any other field set to a non-default value is refused. None: unchecked.
        config_wide_fields: Block-config fields the descriptor builds every layer with the model's own value of
            (field -> config key): a block config may only repeat that value.
        image_text: Its model types are image-text models, built through AutoModel's image-text class.
        automodel_needs_cuda: Why AutoModel's own implementation of its model type (chosen for a plain
            checkpoint, without a descriptor) needs CUDA; None where it runs anywhere.
        replaces_automodel_parallelizer: Its models bring an AutoModel parallelizer of their own, which the
            per-layer plan replaces.
    """

    descriptor_names: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    applied_fields: frozenset[str] | None = None
    config_wide_fields: dict[str, str] = {}
    image_text: bool = False
    automodel_needs_cuda: str | None = None
    replaces_automodel_parallelizer: bool = False

    def __init__(self, *descriptor_names: str):
        if descriptor_names:
            self.descriptor_names = descriptor_names

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.descriptor_names}"

    # --- descriptor choice ---------------------------------------------------------------------------------

    def refine_auto(self, detected: str, config: dict) -> str:
        """``anymodel_descriptor=auto``: the name to use where ModelOpt detected ``detected`` from ``config``."""
        return detected

    def fix_descriptor(self, descriptor: type) -> type:
        """The descriptor class to build with: ModelOpt's, or this example's fix of it."""
        return descriptor

    # --- build (``patch_automodel``), in call order ----------------------------------------------------------

    def prepare_checkpoint(self, config_source, kwargs: dict) -> None:
        """Before the config is read: adjust the build's ``kwargs`` (e.g. ``trust_remote_code``)."""

    def prepare_config(self, hf_config, block_configs: list[dict] | None, source, kwargs: dict) -> None:
        """After the block configs are read: check them against the model's layers, adjust ``kwargs``.

        Raises ``AnyModelError`` for block configs the build would not follow."""

    def build_class(self, cls: type, hf_config) -> type:
        """The AutoModel class that builds ``hf_config`` (same ``from_pretrained``/``from_config`` as ``cls``)."""
        return cls

    def prepare_build_kwargs(self, hf_config, kwargs: dict) -> None:
        """Last changes to the build's ``kwargs`` (e.g. a freeze policy)."""

    def after_build(self, model: nn.Module) -> None:
        """Called on each built model part (a pipeline stage, or the whole model)."""

    # --- parallelism -----------------------------------------------------------------------------------------

    def owns(self, model: nn.Module) -> bool:
        """``model`` is one of this architecture's (used where a built model, not a descriptor, is at hand)."""
        return False

    def tp_plan(self, model: nn.Module, tp_size: int, sequence_parallel: bool,
                user_plan: dict | str | None) -> dict[str, ParallelStyle]:
        """The per-layer TP plan (no ``.*.`` wildcards) for ``model`` on a ``tp`` mesh of ``tp_size``.

        Default: AutoModel's plan for the model (the user's ``distributed.tp_plan`` when given), expanded
        layer by layer by ``tensor_parallel.per_layer_tp_plan``.
        """
        from nemo_automodel.components.distributed.optimized_tp_plans import _parallelize_llama
        from nemo_automodel.components.distributed.parallelizer import _get_parallel_plan

        if user_plan is None and type(model).__name__ in LLAMA_LAYOUT:
            base_plan = _parallelize_llama(model, sequence_parallel)
        else:
            base_plan = _get_parallel_plan(model, sequence_parallel, user_plan, tp_size=tp_size)
        return per_layer_tp_plan(model, base_plan, tp_size, sequence_parallel)

    def parallelism_problem(self, section: str, descriptor_name: str | None, sizes: dict[str, int]) -> str | None:
        """Why ``section``'s model (built with ``descriptor_name``, None for a plain checkpoint) cannot run
        with these ``distributed`` sizes (``tp_size``, ``pp_size``, ``cp_size``); None where it can."""
        return None

    # --- process-wide patches --------------------------------------------------------------------------------

    def install(self) -> None:
        """Patch AutoModel or transformers for this architecture's models. Idempotent."""

    def uninstall(self) -> None:
        """Undo :meth:`install`. Idempotent."""


class Dense(Architecture):
    """A dense decoder descriptor whose ModelOpt build needs nothing of this example (Llama, Qwen2, Qwen3,
    Mistral-Small): KV heads, FFN width and no-op blocks per layer."""

    applied_fields = DENSE_FIELDS
