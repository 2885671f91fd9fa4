"""Decide whether an attention site is self-, cross- or joint (text+video) attention.

Backends care: sliding-tile and video-sparse attention apply to video self-attention (and the
video part of joint attention), never to cross-attention onto text. The role is read from the
dataflow: where q's tokens and k's tokens come from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import Node

from fv_compile.passes import spellings as sp
from fv_compile.passes.find_sites import AttentionMatch

_MAX_WALK = 2048
_LINEAR = {F.linear, torch._C._nn.linear, torch.addmm}


def classify_role(match: AttentionMatch) -> None:
    """Fill `match.site.role` (and the text split of joint attention)."""
    site = match.site
    seq_cat = _token_concat(match.q.node, site.q_len)
    if seq_cat is not None and site.q_len is not None and site.q_len == site.kv_len:
        site.role = "joint"  # (a concat along the tokens was found: q_len is a static size)
        pieces = seq_cat
        video = max(pieces)
        at = [i for i, n in enumerate(pieces) if n == video]
        if len(at) == 1 and at[0] in (0, len(pieces) - 1):
            site.joint_text_len = site.q_len - video
            site.joint_text_first = at[0] != 0
        # else the lengths do not tell the video from the text (pieces of equal length, or the
        # longest between two others): the split stays unknown, and no backend that needs it
        # serves the site (`Capabilities.unsupported_reasons`)
        return
    if site.q_len != site.kv_len:
        site.role = "cross"
        return
    qs, ks = _stream(match.q.node), _stream(match.k.node)
    site.role = "cross" if (qs is not None and ks is not None and qs is not ks) else "self"


def _main_input(node: Node) -> Node | None:
    """The activation a node transforms: its first tensor argument (the data path of the op)."""
    for a in node.args:
        if isinstance(a, list | tuple):
            a = next((x for x in a if isinstance(x, Node)), None)
        if isinstance(a, Node) and _is_activation(sp.value_of(a)):
            return a
    return None


def _is_activation(value) -> bool:
    """A tensor, or the tuple of tensors an unbind/split/chunk produced."""
    if isinstance(value, list | tuple):
        return bool(value) and isinstance(value[0], torch.Tensor)
    return isinstance(value, torch.Tensor)


def _is_linear(node: Node) -> bool:
    if node.op == "call_function" and node.target in _LINEAR:
        return True
    if node.op == "call_module":
        owner = node.graph.owning_module
        if owner is None or not isinstance(node.target, str):  # a bare Graph has no submodules
            return False
        mod = owner.get_submodule(node.target)
        return isinstance(mod, torch.nn.Linear)
    return False


def _stream(node: Node) -> Node | None:
    """The input of the projection that produced `node` (q or k): tokens from the same stream
    share it."""
    cur: Node | None = node
    for _ in range(64):
        if cur is None or cur.op == "placeholder":
            return None
        if _is_linear(cur):
            x = cur.args[1] if cur.target is torch.addmm else cur.args[0]
            return x if isinstance(x, Node) else None
        cur = _main_input(cur)
    return None


def _token_concat(node: Node, seq_len: int | None) -> list[int] | None:
    """Sizes of the pieces when q's tokens were made by concatenating streams along the token axis
    (video + text), looking back along the data path."""
    cur: Node | None = node
    for _ in range(_MAX_WALK):
        if cur is None or cur.op == "placeholder":
            return None
        if cur.op == "call_function" and cur.target in (torch.cat, torch.concat, torch.concatenate):
            tensors = cur.args[0]
            dim = sp.arg(cur, 1, "dim", 0)
            shape = sp.shape_of(cur)
            if shape is not None and isinstance(dim, int) and isinstance(tensors, list | tuple):
                d = dim % len(shape)
                if len(shape) >= 3 and d != len(shape) - 1 and shape[d] == seq_len:
                    sizes = [ts[d] for t in tensors if (ts := sp.shape_of(t)) is not None]
                    if len(sizes) == len(tensors) and len(sizes) >= 2:
                        return sizes
        cur = _main_input(cur)
    return None
