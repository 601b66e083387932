"""Request ids: UUID4 strings, unique, and a forked worker does not repeat its parent's."""

from __future__ import annotations

import os
import re
import uuid

from router.requestid import BATCH, new_request_id

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_ids_are_version_4_uuids_and_unique() -> None:
    ids = [new_request_id() for _ in range(10 * BATCH + 7)]  # across several batches
    assert len(set(ids)) == len(ids)
    variants = set()
    for rid in ids:
        assert UUID4.fullmatch(rid), rid
        u = uuid.UUID(rid)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == rid
        variants.add(rid[19])
    assert variants == set("89ab")  # every variant nibble occurs: the random bits are used


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    new_request_id()  # the parent has a batch ready
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write its next ids and leave at once
        try:
            os.write(w, ",".join(new_request_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        child = os.read(r, 4096).decode().split(",")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    parent = [new_request_id() for _ in range(5)]
    assert len(child) == 5 and not set(child) & set(parent)
