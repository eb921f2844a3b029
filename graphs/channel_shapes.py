"""The shape and layout ops a channel walk passes channels through.

Transpose, Pad, Concat, Split, Resize, Reshape, Flatten and Shape keep a tensor's channels
whole when they only move, pad, assemble or read the other axes; :class:`ShapeOps` says
when, for :class:`~onnxpipe.graphs.channel_walk.ChannelWalk`. A handler that returns False
leaves the node to the walk, which blocks what it cannot follow.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxpipe.graphs.base import attr_int, constant
from onnxpipe.graphs.channel_record import ChannelRecord
from onnxpipe.graphs.channel_record import rank_of as _rank
from onnxpipe.graphs.channel_space import Part, Segment, ShapeEdit, concat_axis, static_dim


class ShapeOps(ChannelRecord):
    """Handlers for the ops that move channels without computing on them."""

    def _layout(self, node: ir.Node) -> bool:
        """A Transpose that moves the channels to axis 1 or to the last axis.

        tf2onnx keeps a Keras model's NHWC ops (activations, Dense, LayerNorm) between
        Transposes around the NCHW convs; the channels follow the permutation.
        """
        value, out = node.inputs[0], node.outputs[0]
        perm = node.attributes.get("perm")
        rank = _rank(value) if value is not None else None
        if value is None or perm is None or rank is None or rank < 3:
            return False
        order = list(perm.as_ints())
        moved = order.index(self._channel_axis(value, rank))
        if moved not in (1, rank - 1):
            return False
        self.join(value, out)
        if moved == rank - 1:
            self.last.add(id(out))
        return True

    def _spatial_pad(self, node: ir.Node) -> bool:
        """A constant-mode Pad that adds nothing on the channel axis.

        tf2onnx pads a Keras NHWC map this way before a strided depthwise conv.
        """
        value = node.inputs[0]
        rank = _rank(value) if value is not None else None
        pads = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = node.inputs[3] if len(node.inputs) > 3 else None
        mode = node.attributes.get("mode")
        if value is None or rank is None or pads is None or axes is not None:
            return False
        if (mode.as_string() if mode is not None else "constant") != "constant":
            return False
        channel = self._channel_axis(value, rank)
        flat = pads.reshape(-1)
        if flat.size != 2 * rank or flat[channel] != 0 or flat[channel + rank] != 0:
            return False
        self.join(value, node.outputs[0])
        if id(value) in self.last:
            self.last.add(id(node.outputs[0]))
        return True

    def _channel_concat(self, node: ir.Node) -> bool:
        """A Concat on the channel axis whose inputs' channel counts are known.

        Axis 1 of NCHW maps or ``[N, C]`` rows, or the last axis of channels-last tensors
        (token features, NHWC maps). Each input's group goes on at its offset
        (:class:`Segment`); the output starts a channel space of its own, which
        :func:`find_groups` hands to the input groups.
        """
        out = node.outputs[0]
        rank = _rank(out)
        if rank is None or rank < 2 or not node.inputs or None in node.inputs:
            return False
        last = [id(v) in self.last for v in node.inputs]  # type: ignore[union-attr]
        if any(last) != all(last):
            return False
        axis = concat_axis(node)
        if axis != (rank - 1 if all(last) and rank > 2 else 1):
            return False
        for value in node.inputs:
            shape = value.shape  # type: ignore[union-attr]
            if shape is None or len(shape) != rank or not isinstance(shape[axis], int):
                return False
        self.track(out)
        self.assembled[id(out)] = f"Concat node {node.name!r}"
        if all(last):
            self.last.add(id(out))
        for index, value in enumerate(node.inputs):
            if value is not None and constant(value) is None:
                self.track(value)
                self.links.append((value, Segment(node, index)))
        return True

    def _channel_split(self, node: ir.Node) -> bool:
        """A Split on the channel axis into outputs of known sizes (YOLOv8's C2f ``chunk``).

        Each output takes a slice of the input's channels (:class:`Part`) and starts a
        channel space of its own, which :func:`find_groups` hands to the input's group.
        """
        value = node.inputs[0] if node.inputs else None
        rank = _rank(value) if value is not None else None
        if value is None or rank is None or not node.outputs:
            return False
        axis = attr_int(node, "axis", 0) % rank
        if axis != self._channel_axis(value, rank):
            return False
        sizes = []
        for out in node.outputs:
            if out.shape is None or len(out.shape) != rank or not isinstance(out.shape[axis], int):
                return False
            sizes.append(static_dim(out, axis))
        start = 0
        self.track(value)
        for index, (out, size) in enumerate(zip(node.outputs, sizes, strict=True)):
            self.track(out)
            self.assembled[id(out)] = f"Split node {node.name!r}"
            if id(value) in self.last:
                self.last.add(id(out))
            self.splits.append((value, Part(node, index, start, size)))
            start += size
        return True

    def _spatial_resize(self, node: ir.Node) -> bool:
        """A Resize by constant scales that leave the channel axis alone.

        Upsampling in a U-Net or an FPN resizes each channel on its own.
        """
        value = node.inputs[0]
        scales = constant(node.inputs[2]) if len(node.inputs) > 2 else None
        sizes = node.inputs[3] if len(node.inputs) > 3 else None
        rank = _rank(value) if value is not None else None
        if value is None or scales is None or sizes is not None or rank is None:
            return False
        if scales.size != rank or scales.reshape(-1)[1] != 1.0 or "axes" in node.attributes:
            return False
        self.join(value, node.outputs[0])
        return True

    def _token_reshape(self, node: ir.Node) -> bool:
        """A Reshape that keeps the channels-last axis whole: ``[B, S, C] <-> [B * S, C]``.

        GPT-2's ``Conv1D`` layers flatten the tokens for a Gemm and restore ``[B, S, C]``
        after it, with a target computed from the input's shape and a constant ``C`` (a
        Concat). With the last dim equal on both sides, every row is one token intact, so the
        channels pass through; the constant ``C`` is what the cut rewrites (ONNX shape
        inference may not know the restored last dim; the constant says what it is).
        """
        value, out = node.inputs[0], node.outputs[0]
        if value is None or value.shape is None or out.shape is None:
            return False
        if not (len(value.shape) == 2 or id(value) in self.last) or len(out.shape) < 2:
            return False
        known = value.shape[-1]
        channels = known if isinstance(known, int) else None
        edit = _target_edit(node, len(out.shape), channels)
        # a constant last element fixes the last dim; an inferred one (-1) must be seen equal
        if edit is None or channels == 1 or (edit.index < 0 and out.shape[-1] != channels):
            return False
        if channels is None:  # the group's weights must then agree with the target
            self.expects.append((value, edit.count()))
        self.join(value, out)
        if len(out.shape) > 2:
            self.last.add(id(out))
        if edit.index >= 0:
            self.reshapes.append((value, edit))
        return True

    def _reads_other_dims(self, node: ir.Node) -> bool:
        """A Shape whose users only pick dims other than the channel axis.

        tf2onnx's ``Tensordot`` (a Keras ``Dense`` on a 4-D input) computes its output shape
        from the leading dims of its input: Shape -> Cast -> Gather([0, 1, 2]).
        """
        value = node.inputs[0]
        rank = _rank(value) if value is not None else None
        if (
            value is None
            or rank is None
            or node.attributes.get("start")
            or "end" in node.attributes
        ):
            return False
        channel = self._channel_axis(value, rank)
        users = [use.node for use in node.outputs[0].uses()]
        while len(users) == 1 and users[0].op_type == "Cast":
            users = [use.node for use in users[0].outputs[0].uses()]
        for user in users:
            picked = constant(user.inputs[1]) if user.op_type == "Gather" else None
            if picked is None or attr_int(user, "axis", 0) != 0:
                return False
            if any(int(i) % rank == channel for i in picked.reshape(-1)):
                return False
        return bool(users)

    def _flatten(self, node: ir.Node) -> None:
        """``[N, C, 1, 1] -> [N, C]`` (Flatten or Reshape), and Reshapes between such shapes.

        tf2onnx's squeeze-and-excitation reshapes the pooled ``[N, C]`` to ``[N, C, 1, 1]``
        for the 1x1 convs, and reshapes their outputs to the shape they already have. A
        Reshape's target keeps ``C`` in position 1, which the cut rewrites.
        """
        value, out = node.inputs[0], node.outputs[0]
        assert value is not None
        ok = _unit_spatial(value.shape) and _unit_spatial(out.shape)
        if node.op_type == "Flatten":
            ok = ok and attr_int(node, "axis", 1) == 1 and len(out.shape or ()) == 2
        elif ok:
            target = constant(node.inputs[1])
            ok = (
                target is not None
                and target.size == len(out.shape)  # type: ignore[arg-type]
                and int(target[0]) in (-1, 0)
                and all(int(t) == 1 for t in target.reshape(-1)[2:])
            )
            if ok:
                self.reshapes.append((value, ShapeEdit(node, 1, 1, node)))
        if ok:
            self.join(value, out)
        else:
            self._opaque(node, [value])


def _target_edit(reshape: ir.Node, rank: int, channels: int | None) -> ShapeEdit | None:
    """Where ``reshape``'s target holds ``channels`` as its last element; None if it does not.

    The target is a constant, or a Concat whose last piece is one (through tf2onnx's Casts).
    A last element of -1 needs no edit (index -1). ``channels`` None (unknown): any positive
    last element.
    """
    target = reshape.inputs[1] if len(reshape.inputs) > 1 else None
    array = constant(target)

    def fits(last: int) -> bool:
        return last == channels if channels is not None else last > 0

    if array is not None:
        last = int(array.reshape(-1)[-1]) if array.size == rank else 0
        if last == -1 and channels is not None:
            return ShapeEdit(reshape, -1, rank - 1, reshape)
        return ShapeEdit(reshape, 1, rank - 1, reshape) if fits(last) else None
    concat = target.producer() if target is not None else None
    while concat is not None and concat.op_type == "Cast" and concat.inputs[0] is not None:
        if len(concat.outputs[0].uses()) != 1:  # tf2onnx casts the computed target to int64
            return None
        concat = concat.inputs[0].producer()
    if concat is None or concat.op_type != "Concat" or not concat.inputs:
        return None
    if concat.outputs[0] is not target and len(concat.outputs[0].uses()) != 1:
        return None  # shared behind a Cast: a copy would not reach this Reshape alone
    piece = constant(concat.inputs[-1])
    last = int(piece.reshape(-1)[-1]) if piece is not None and piece.size else 0
    if not fits(last):
        return None
    return ShapeEdit(concat, len(concat.inputs) - 1, piece.size - 1, reshape)  # type: ignore[union-attr]


def _unit_spatial(shape: ir.Shape | None) -> bool:
    """``[N, C]`` or ``[N, C, 1, ...]``: channels on axis 1 and nothing else but the batch."""
    return shape is not None and len(shape) >= 2 and all(d == 1 for d in list(shape)[2:])
