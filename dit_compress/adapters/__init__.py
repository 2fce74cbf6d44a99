"""Parameter-efficient adaptation: TD-LoRA, DiffScaler and plain LoRA as named peft adapters.

Importing this package registers TD-LoRA and DiffScaler with peft (see `methods`).
"""

from .methods import METHODS
from .store import adapter_names, attach, load_adapter, save_adapter, train_only, use  # noqa: F401
from .td_lora import timestep_scale

# Linear layers every family names the same way (attention projections and FFN), matched as suffixes.
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
LABEL_TABLES = ["class_embedder.embedding_table"]  # diffusers' class-label embeddings (DiT)


def default_config(method: str, model, num_task_classes: int = 1) -> dict:
    """Each method's config at a comparable budget (~4-5 % of the bundled DiT's parameters)."""
    has_labels = any(n.endswith(LABEL_TABLES[0]) for n, _ in model.named_modules())
    if method == "lora":
        return {"r": 7, "lora_alpha": 7, "target_modules": DEFAULT_TARGETS}
    if method == "td_lora":
        # 3 experts of rank 2: the parameters of a rank-6 LoRA (+ routers). alpha = r * K makes the
        # update at uniform gates exactly that rank-6 LoRA at scale 1 (the gates sum to 1, so alpha = r
        # would start every expert at a third of LoRA's scale); the router then moves weight across t.
        return {"r": 2, "num_experts": 3, "lora_alpha": 6, "time_scale": timestep_scale(model),
                "target_modules": DEFAULT_TARGETS}
    if method == "diffscaler":
        return {"bottleneck": 4, "num_task_classes": num_task_classes,
                "target_modules": DEFAULT_TARGETS + (LABEL_TABLES if has_labels else [])}
    raise ValueError(f"unknown adapter method {method!r}; available: {', '.join(METHODS)}")
