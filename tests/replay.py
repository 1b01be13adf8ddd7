"""A stand-in for :class:`sdnsup.netlink.Netlink` that replays the kernel's answers.

Each answer is the kernel's messages as bytes, netlink headers included: the fake splits
them with :func:`sdnsup.netlink.messages` and hands each body to the parser at its real
offset, the way the engine does, so a parser that reads outside its message fails here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import TypeVar

from sdnsup.netlink import (
    NLM_F_DUMP_INTR,
    NLMSG_DONE,
    NLMSG_ERROR,
    Ack,
    messages,
    oserror,
    parse_ack,
)

T = TypeVar("T")
B = TypeVar("B")


class ReplayNetlink:
    """Records every request; answers each dump and request with the next bytes (or error)
    given to it; refuses the batched requests whose sequence number ``refuse`` names; answers
    an nfnetlink transaction with ``acks(sequence numbers of its requests)``, or raises it."""

    def __init__(
        self,
        dumps: Iterable[bytes | OSError] = (),
        answers: Iterable[bytes | OSError] = (),
        refuse: dict[int, int] | None = None,
        acks: Callable[[list[int]], list[tuple[int, Ack]]] | OSError | None = None,
    ) -> None:
        self.dumps = list(dumps)
        self.answers = list(answers)
        self.refuse = dict(refuse or {})  # sequence number -> errno of its error ack
        self.acks = acks or (lambda seqs: [(seq, Ack(0, None, None)) for seq in seqs])
        self.sent: list[tuple[int, bytes]] = []  # (message type, body) of dumps and requests
        self.batches: list[list[bytes]] = []  # the complete messages of each batch
        self.transactions: list[bytes] = []  # each nfnetlink batch as sent
        self.seqs = itertools.count(1)
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def next_seq(self) -> int:
        return next(self.seqs)

    def dump(
        self, kind: int, body: bytes, parse: Callable[[int, bytes, int, int], T | None]
    ) -> tuple[list[T], bool]:
        self.sent.append((kind, body))
        data = self.dumps.pop(0)
        if isinstance(data, OSError):
            raise data
        out: list[T] = []
        interrupted = False
        for mtype, flags, _seq, _port, start, end in messages(data, len(data)):
            interrupted |= bool(flags & NLM_F_DUMP_INTR)
            if mtype == NLMSG_DONE:
                break
            item = parse(mtype, data, start, end)
            if item is not None:
                out.append(item)
        return out, interrupted

    def request(self, kind: int, body: bytes) -> tuple[int, bytes, int, int]:
        self.sent.append((kind, body))
        data = self.answers.pop(0)
        if isinstance(data, OSError):
            raise data
        ((mtype, flags, _seq, _port, start, end),) = messages(data, len(data))
        if mtype == NLMSG_ERROR:
            code, text, _ = parse_ack(flags, data, start, end)
            raise oserror(code, text)
        return mtype, data, start, end

    def batch(
        self,
        items: Iterable[B],
        encode: Callable[[B, int], bytes],
        ok: frozenset[int] = frozenset(),
    ) -> list[tuple[B, OSError]]:
        sent: list[bytes] = []
        failures: list[tuple[B, OSError]] = []
        for item in items:
            seq = self.next_seq()
            sent.append(encode(item, seq))
            code = self.refuse.get(seq, 0)
            if code and code not in ok:
                failures.append((item, oserror(code)))
        self.batches.append(sent)
        return failures

    def transaction(self, batch: bytes, requests: int) -> list[tuple[int, Ack]]:
        self.transactions.append(batch)
        seqs = [seq for _kind, _flags, seq, *_rest in messages(batch, len(batch))]
        assert len(seqs) == requests + 2  # BATCH_BEGIN, the requests, BATCH_END
        if isinstance(self.acks, OSError):
            raise self.acks
        return self.acks(seqs[1:-1])
