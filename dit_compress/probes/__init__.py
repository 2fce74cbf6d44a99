"""Activation capture and the probes built on it, shared by the stages.

`capture`: forward hooks on named modules, as one context manager. `taylor`: the task loss
whose gradients score neurons and channels. `boundaries`: hidden states at block boundaries,
Block Influence, the image-stream width, the calls each block receives. `redundancy`: CKA,
linear probes and redundant intervals of the block boundaries (PPCL's analysis)."""
