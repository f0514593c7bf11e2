"""flash_attention: FA2-style attention, varlen and GQA (issue 5). Skeleton: to be written."""

from moon_fast.backends import op_backends

BACKENDS = op_backends("flash_attention", {"cuda": ("flash_attn", "triton", "sdpa"), "cpu": ("torch",)})


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                    max_seqlen_q=None, max_seqlen_k=None, backend="auto"):
    raise NotImplementedError("flash_attention: not written yet")


def flash_attn_func(*args, **kwargs):
    raise NotImplementedError


def flash_attn_varlen_func(*args, **kwargs):
    raise NotImplementedError
