"""contrastive_loss: InfoNCE without the N x M similarity matrix (issue 3). Skeleton: to be written."""

from moon_fast.backends import op_backends

BACKENDS = op_backends("contrastive_loss", {"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)})


def contrastive_loss(query, key, logit_scale, *, target=None, query_group=None, key_group=None,
                     weight=None, symmetric=False, gather=False, reduction="mean", backend="auto"):
    raise NotImplementedError("contrastive_loss: not written yet")


def multi_contrastive_loss(*args, **kwargs):
    raise NotImplementedError("multi_contrastive_loss: not written yet")
