"""ByteSeq: several byte arrays read as one sequence, without joining them.

A corpus can be far larger than memory, so its files stay where they are (memory-mapped, or
one in-memory buffer for many small files) and `ByteSeq` indexes their concatenation: slicing
gives a narrower ByteSeq over the same arrays, and `windows` gathers fixed-length windows,
which may run from one part into the next.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class ByteSeq:
    """A read-only, virtual concatenation of 1-D uint8 numpy arrays (the parts).

    Nothing is copied: slices share the parts, and only the bytes of the windows asked for
    are read. Parts may be `np.memmap`s, so a sequence can be larger than memory.
    """

    __slots__ = ("_begins", "_ends", "_len", "_parts")

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        """Concatenate `parts` in order.

        Args:
            parts: 1-D uint8 arrays; empty ones are dropped (they hold no bytes to index), and
                non-contiguous ones copied.

        Raises:
            ValueError: a part is not a 1-D uint8 array.
        """
        for part in parts:
            if not isinstance(part, np.ndarray) or part.ndim != 1 or part.dtype != np.uint8:
                raise ValueError(f"ByteSeq parts must be 1-D uint8 numpy arrays, got {type(part).__name__} "
                                 f"{getattr(part, 'dtype', '')} {getattr(part, 'shape', '')}")
        # Contiguous parts let `_rows` view them as windows; slices of files always are.
        self._parts = tuple(
            part if part.flags.c_contiguous else np.ascontiguousarray(part) for part in parts if len(part)
        )
        lengths = np.array([len(part) for part in self._parts], dtype=np.int64)
        self._ends = np.cumsum(lengths)
        self._begins = self._ends - lengths
        self._len = int(self._ends[-1]) if len(self._parts) else 0

    @property
    def parts(self) -> tuple[np.ndarray, ...]:
        """The non-empty arrays whose concatenation this is, in order (shared, not copies)."""
        return self._parts

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"ByteSeq({self._len} bytes in {len(self._parts)} parts)"

    def __getitem__(self, key: slice) -> ByteSeq:
        """The bytes [start, stop) as a ByteSeq sharing this one's parts (a view, no copy).

        Raises:
            TypeError: key is not a slice of step 1.
        """
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"ByteSeq supports only slices of step 1, got {key!r}; use windows() or tensor() for bytes")
        start, stop, _ = key.indices(self._len)
        if stop <= start:
            return ByteSeq([])
        # Parts overlapping [start, stop): the first whose end is past start, up to the one holding stop - 1.
        first = int(np.searchsorted(self._ends, start, side="right"))
        last = int(np.searchsorted(self._ends, stop - 1, side="right"))
        parts = list(self._parts[first : last + 1])
        # Trim the last part before the first, in case they are the same part.
        parts[-1] = parts[-1][: stop - int(self._begins[last])]
        parts[0] = parts[0][start - int(self._begins[first]) :]
        return ByteSeq(parts)

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """The bytes [s, s + length) for every s in `starts`; a window may span several parts.

        Args:
            starts: integer tensor (CPU) of window starts, any shape, read in order;
                0 <= s <= len(self) - length.
            length: bytes per window, >= 1.

        Returns:
            uint8 tensor [starts.numel(), length], row i = the window at the i-th start.

        Raises:
            ValueError: length < 1.
            IndexError: a window does not lie wholly inside the sequence.
        """
        if length < 1:
            raise ValueError(f"windows need length >= 1, got {length}")
        at = starts.numpy().reshape(-1)
        if at.dtype != np.int64:
            at = at.astype(np.int64)
        # The common case (the stdlib corpus is one part) is called every training step, so it
        # skips the part lookup and the upper bound check: indexing the rows checks that itself.
        if len(self._parts) == 1 and len(at) and int(at.min()) >= 0 and len(self._parts[0]) >= length:
            try:
                return torch.from_numpy(_rows(self._parts[0], length)[at])
            except IndexError:
                pass  # a window runs past the end: reported below, like any other
        if len(at) == 0:
            return torch.empty((0, length), dtype=torch.uint8)
        if int(at.min()) < 0 or int(at.max()) + length > self._len:
            raise IndexError(f"windows of {length} bytes starting in [{int(at.min())}, {int(at.max())}] do not fit "
                             f"in a ByteSeq of {self._len} bytes")
        part = np.searchsorted(self._ends, at, side="right")  # the part each window starts in
        local = at - self._begins[part]
        first = int(part[0])
        if (part == first).all() and int(local.max()) + length <= len(self._parts[first]):
            # Every window inside one part: a single vectorized gather, as for one array.
            return torch.from_numpy(_rows(self._parts[first], length)[local])
        # Windows in several parts: one contiguous slice copy per window (and per part it
        # crosses). Measured against one `_rows` gather per part: 8 windows of 129 bytes take
        # ~6 us this way, 13-36 us grouped (2-1000 parts); 64 windows ~29 us, 16-250 us grouped.
        out = np.empty((len(at), length), dtype=np.uint8)
        for row, p, offset in zip(out, part.tolist(), local.tolist(), strict=True):
            filled = 0
            while filled < length:
                piece = self._parts[p][offset : offset + length - filled]
                row[filled : filled + len(piece)] = piece
                filled += len(piece)
                p, offset = p + 1, 0
        return torch.from_numpy(out)

    def tensor(self) -> torch.Tensor:
        """All the bytes as one new 1-D uint8 tensor (a copy: for tests and small sequences).

        Returns:
            uint8 tensor of len(self) bytes, the parts joined in order.
        """
        if not self._parts:
            return torch.empty(0, dtype=torch.uint8)
        return torch.from_numpy(np.concatenate(self._parts))


def _rows(part: np.ndarray, length: int) -> np.ndarray:
    """All windows of `length` bytes of a contiguous part as rows of a view: row i is part[i : i + length].

    Nothing is copied (consecutive rows overlap in memory), so `_rows(part, n)[starts]` copies
    just the windows asked for, one contiguous run each: cheaper than a gather through an
    index array of len(starts) x length positions.
    """
    return np.ndarray((len(part) - length + 1, length), dtype=np.uint8, buffer=part, strides=(1, 1))
