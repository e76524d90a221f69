"""The server step: forward, loss, and backward to the hidden representations only.

    batch (rows tagged with user)
      -> server: forward with adapters (merged or routed) -> loss -> backward to hidden only
      -> packets: per (user, site): x rows, dL/dh rows   [padding tokens dropped]
      -> backend: fit(adapter, packets) on a worker      [GL squared-loss step]
      -> updates: per (user, site): new weights, version
      -> server applies updates -> next batch

The server holds no trainable parameter: the base is frozen and its adapters are frozen
copies. `torch.autograd.grad` takes dL/dh at the site outputs directly, so no parameter
`.grad` is ever populated and no parameter-gradient kernel runs. The backward still goes
through each adapter's Jacobian with respect to its input (or through W + delta_W when
merged), which is what makes dL/dh exact at earlier sites (ColA, Diao et al. 2024, §3).
"""
from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colaft.model import ColaModel, batch_rows
from colaft.packets import Packet, tensor_key
from colaft.packing import kept_rows, packets
from colaft.routing import Route, per_row
from colaft.sites import Call

LossFn = Callable[[object, Mapping], torch.Tensor]
PADDING_MASKS = ("attention_mask", "decoder_attention_mask")  # (B, T): 0 marks padding
IGNORE_INDEX = -100  # labels: a position the loss ignores (transformers' convention)


@dataclass
class ServerStep:
    loss: torch.Tensor  # detached; with several users, the sum of the users' mean losses
    packets: list[Packet]  # per (user, site call): that user's rows only
    user_losses: dict[str, float]  # each user's mean loss on its rows


def server_step(model: ColaModel, batch: Mapping, loss_fn: LossFn | None = None,
                users: Sequence[str] | None = None, stream_packets: bool | None = None,
                in_flight: int = 4) -> ServerStep:
    """Run one server step on `batch`.

    Args:
        model: the adapted model.
        batch: keyword arguments of the model's forward, labels included; a "users" entry
            (one id per row) is taken as `users`.
        loss_fn: `loss_fn(output, batch) -> loss` for models that do not return `.loss`; for a
            batch of several users it must return one loss per row, shape (B,).
        users: the user of every row, or one user (a str) for every row (None: the model's only user).
        stream_packets: copy each site's x and dL/dh to host memory while the backward runs, as
            soon as dL/dh there is produced (`HostCopies`): the step then keeps no site's x or
            dL/dh on the device once the backward is past that site (autograd may still hold an
            x it saved for an earlier node). None: on for a CUDA server, off where packets
            already live in host memory. The packets are the same bits either way.
        in_flight: with streaming, the most copies under way at once (pinned host buffers held
            by unfinished copies).
    Returns:
        ServerStep: the loss, one packet per (user, site call) that the loss depends on, and
        the users' losses. With several users the loss is the sum over users of each user's
        mean loss, so a user's dL/dh does not depend on who else shares the batch.
    """
    batch = dict(batch)
    users = batch.pop("users", None) if users is None else users
    batch.pop("users", None)
    users = per_row(users, batch_rows((), batch))
    if users is not None and any(u is None for u in users):
        raise ValueError("every training row needs a user (None routes a row to the base model at inference only)")
    if users is None and len(model.users) > 1:
        raise ValueError(f"the model has {len(model.users)} users: pass users=[...] (one per row)")
    padding = _padding(batch)  # before the forward: the device has little queued to wait for
    inputs = batch
    mixed = users is not None and len(set(users)) > 1
    if mixed and loss_fn is None and not getattr(getattr(model.model, "config", None), "is_encoder_decoder", False):
        # the per-user losses below come from the logits: the model's own loss would keep a
        # second log-softmax of the whole batch alive (an encoder-decoder needs labels for its inputs)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
    with model.routing(users) as route, model.recording() as calls:
        output = model.model(**inputs)
        if route is None or route.single is not None:
            loss = output.loss if loss_fn is None else loss_fn(output, batch)
            if loss is not None and loss.dim() > 0:  # per-row losses: their mean
                loss = loss.mean()
            user_losses = {route.single if route else model.users[0]: loss}
        else:
            user_losses = _user_losses(model, output, batch, route, loss_fn)
            loss = sum(user_losses.values())
    del output  # the logits are not needed past the loss: free them before the backward
    if loss is None:
        raise ValueError("the model returned no loss: pass labels in the batch or give a loss_fn")
    if not calls or not loss.requires_grad:
        raise RuntimeError("the loss depends on no adapted site")
    blind = sorted({c.site.name for c in calls if c.edge is None})
    if blind:  # their graph is gone: dL/dh cannot be taken there
        raise RuntimeError(f"sites ran without autograd: {', '.join(blind)}. Reentrant activation checkpointing "
                           "does this; use the non-reentrant kind (use_reentrant=False)")
    # by graph edge, not by tensor: a tensor modified in place afterwards would give dL/d(modified)
    edges = [c.edge for c in calls]
    if stream_packets if stream_packets is not None else loss.device.type == "cuda":
        copies = HostCopies(calls, in_flight)
        torch.autograd.backward(loss, inputs=edges)  # into no tensor: each dL/dh reaches its hook, then goes
        grads = copies.finish()
        padding = {shape: m.cpu() for shape, m in padding.items()}
    else:
        grads = list(torch.autograd.grad(loss, edges, allow_unused=True))
    del edges
    keep = kept_rows(calls, grads, padding)
    return ServerStep(loss.detach(), packets(calls, grads, keep), {u: v.item() for u, v in user_losses.items()})


class HostCopies:
    """Each call's x and dL/dh copied to host memory as the backward produces dL/dh there.

    A hook on the node that receives h's gradient sees dL/dh as soon as it is complete (every
    use of h summed) and before that node runs; the copy starts there, on a side stream into
    pinned memory on CUDA, and the call's device x is let go, so the device holds the x and
    dL/dh of the sites still to come, not of every site. A shared input (q/k/v) is copied once.
    At most `in_flight` copies are under way: the hook waits for the oldest before starting
    another, which bounds the device tensors kept alive for the copies (and the pinned memory
    being written). `finish` waits for them all; afterwards `calls` hold their host x.
    """

    def __init__(self, calls: list[Call], in_flight: int = 4):
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, not {in_flight}")
        self.calls, self.in_flight = calls, in_flight
        self.grads: list[torch.Tensor | None] = [None] * len(calls)
        self.inputs: dict[tuple, torch.Tensor] = {}  # device x -> its host copy, once per shared input
        self.pending: collections.deque = collections.deque()  # fences of the copies under way, oldest first
        self.most_in_flight = 0
        self.stream = None
        self.handles = [c.edge.node.register_prehook(self._hook(i)) for i, c in enumerate(calls)]

    def _hook(self, i: int):
        def hook(grad_outputs):
            g = grad_outputs[self.calls[i].edge.output_nr]
            if g is not None:
                self._copy(i, g)
        return hook

    def _copy(self, i: int, grad: torch.Tensor) -> None:
        call = self.calls[i]
        key = tensor_key(call.x)
        while len(self.pending) >= self.in_flight:
            self.pending.popleft().synchronize()
        with self._on_side_stream(grad.device):
            if key not in self.inputs:
                self.inputs[key] = self._to_host(call.x)
            self.grads[i] = self._to_host(grad)
            self.pending.append(self._fence(grad.device))
        self.most_in_flight = max(self.most_in_flight, len(self.pending))
        self.calls[i] = Call(call.site, self.inputs[key], call.edge, call.route)  # the device x may go

    def _on_side_stream(self, device: torch.device):
        if device.type != "cuda":
            return contextlib.nullcontext()
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))  # after the kernels that made dL/dh
        return torch.cuda.stream(self.stream)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda":
            return t.clone()  # host memory already: the same copy a device would make
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        return host

    def _fence(self, device: torch.device):
        if device.type != "cuda":
            return _Done()
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def finish(self) -> list[torch.Tensor | None]:
        """Every copy done; the host dL/dh per call (None where the loss does not depend on it)."""
        for handle in self.handles:
            handle.remove()
        while self.pending:
            self.pending.popleft().synchronize()
        grads, self.grads = self.grads, []
        self.inputs.clear()
        return grads


class _Done:
    """The fence of a copy between host tensors: done when made."""

    def synchronize(self) -> None:
        pass


def _padding(batch: Mapping) -> dict[tuple[int, ...], torch.Tensor]:
    """(B, T) -> positions that the batch marks as padding or ignored, at that shape.

    The marks: 0 in `attention_mask` or `decoder_attention_mask`, -100 in integer `labels`
    (a seq2seq batch's padded labels are the decoder's padding). Only shapes with a mark.
    """
    marks = [m == 0 for k in PADDING_MASKS if isinstance(m := batch.get(k), torch.Tensor) and m.dim() == 2]
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and not labels.is_floating_point():
        marks.append(labels == IGNORE_INDEX)
    if not marks:
        return {}
    marked = torch.stack([m.any() for m in marks]).tolist()  # one sync
    out: dict[tuple[int, ...], torch.Tensor] = {}
    for m, any_marked in zip(marks, marked):
        if any_marked:
            shape = tuple(m.shape)
            out[shape] = out[shape] | m if shape in out else m
    return out


def _user_losses(model: ColaModel, output, batch: Mapping, route: Route, loss_fn: LossFn | None) -> dict:
    """Each user's mean loss over its rows (tokens, for a causal LM), from per-element losses."""
    if loss_fn is not None:
        losses = loss_fn(output, batch)
        if losses.dim() != 1 or len(losses) != len(route.users):
            raise ValueError(f"with several users in a batch, loss_fn must return one loss per row "
                             f"(shape ({len(route.users)},)), not shape {tuple(losses.shape)}")
        weights = torch.ones_like(losses)
    else:
        losses, weights = element_losses(model.model, output, batch)
    out = {}
    for u in route.order:
        rows = route.rows_of([u], losses.device)
        w = weights.index_select(0, rows)
        out[u] = (losses.index_select(0, rows) * w).sum() / w.sum().clamp(min=1)
    return out


def element_losses(model, output, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """Unreduced losses of a transformers model's output and their weights (0 for ignored tokens).

    The same losses transformers computes: a causal LM predicts token t+1 from t, an
    encoder-decoder's decoder token t itself (labels -100 ignored, logits in float32); a
    classifier follows `config.problem_type` as transformers does.
    Returns:
        (B, ...) losses and (B, ...) weights.
    """
    logits, labels = output.logits, batch.get("labels")
    if labels is None:
        raise ValueError("the batch has no labels: mixed-user losses need them (or give a loss_fn)")
    config = getattr(model, "config", None)
    if logits.dim() == 3 and labels.dim() == 2:  # token losses
        if not getattr(config, "is_encoder_decoder", False):  # causal LM: the labels are its input
            labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): the next token
        losses = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return losses, (labels != IGNORE_INDEX).to(losses.dtype)
    problem = getattr(config, "problem_type", None)
    if problem is None:
        classes = logits.shape[-1]
        problem = "regression" if classes == 1 else \
            "single_label_classification" if not labels.is_floating_point() else "multi_label_classification"
    if problem == "regression":
        losses = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(len(labels), -1).squeeze(-1),
                            reduction="none")
        losses = losses.view(len(labels), -1).mean(-1)
    elif problem == "single_label_classification":
        losses = F.cross_entropy(logits.view(len(labels), -1), labels.view(-1), reduction="none")
    else:
        losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(-1)
    return losses, torch.ones_like(losses)
