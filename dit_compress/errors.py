"""User-facing errors: each one says what is wrong, where, and how to fix it, in one line."""


class DitcError(Exception):
    """Base class of every error the CLI reports as a single `error:` line."""


class RecipeError(DitcError):
    """A recipe (or a --set override) is invalid."""


class CheckpointError(DitcError):
    """A model or compressed checkpoint is missing, corrupt or of an unsupported kind."""


class UnsupportedModelError(DitcError):
    """The model class has no family adapter."""


class DistillationDiverged(DitcError):
    """The distillation loss became non-finite."""


class ExportParityError(DitcError):
    """The exported graph does not compute what the PyTorch model computes."""


class GateFailed(DitcError):
    """The quality gate was violated."""


class DeploymentUnsupported(DitcError):
    """A deployment target (precision, engine) has no implementation on this machine."""


class AdapterError(DitcError, ValueError):
    """An adapter (TD-LoRA, DiffScaler, LoRA) is misconfigured, missing, or does not fit the model."""
