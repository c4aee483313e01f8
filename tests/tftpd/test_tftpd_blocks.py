"""tftpd.blocks.BlockSource: read-ahead chunks are whole blocks read into buffers of wire-ready
DATA frames, so a lock-step transfer reuses two buffers and copies nothing; the frames are the
file's bytes with the right headers whatever the block size."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tftpd.blocks import BlockSource, FileHandle, chunk_size
from tftpd.netascii import encode as netascii_encode


def _handle_on(tmp_path: Path, data: bytes) -> FileHandle:
    """A FileHandle, checked against its size and mtime at open, on a file holding ``data``."""
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    return FileHandle(fd, expect=(st.st_size, st.st_mtime_ns))


@pytest.mark.parametrize("blksize", [512, 1428, 1468, 8192])
def test_chunks_are_whole_blocks_of_at_least_the_read_ahead(blksize: int) -> None:
    size = chunk_size(256 * 1024, blksize)
    assert size % blksize == 0
    assert 256 * 1024 - blksize < size <= 256 * 1024
    assert chunk_size(4096, blksize) == 32 * blksize  # at least 32 blocks


@pytest.mark.parametrize(("blksize", "windowsize"), [(1428, 16), (1468, 16), (512, 7),
                                                     (512, 64)])
def test_chunks_are_whole_windows_when_that_costs_little(blksize: int,
                                                         windowsize: int) -> None:
    size = chunk_size(256 * 1024, blksize, windowsize)
    assert size % (blksize * windowsize) == 0
    assert 256 * 1024 * 7 // 8 <= size <= 256 * 1024


def test_chunks_stay_whole_blocks_where_whole_windows_would_cut_them_short() -> None:
    # 64 x 1428: two windows would be 30 % less read-ahead (more thread hops per MB).
    assert chunk_size(256 * 1024, 1428, 64) == chunk_size(256 * 1024, 1428)
    # A window larger than the read-ahead: whole blocks, as in lock-step.
    assert chunk_size(64 * 1024, 8192, 64) == 32 * 8192


@pytest.mark.parametrize("blksize", [1428, 512])
async def test_lock_step_blocks_are_the_file_and_the_buffer_one_chunk(
        tmp_path: Path, blksize: int) -> None:
    data = os.urandom(200_000)
    handle = _handle_on(tmp_path, data)
    # 50,000 bytes of read-ahead: more than 32 blocks, and a whole number of neither size.
    source = BlockSource(handle, blksize, 50_000, trio.CapacityLimiter(2))
    chunk = chunk_size(50_000, blksize)
    got = hashlib.sha256()
    seq = 1
    try:
        while True:
            source.release_before(seq)  # lock-step: everything before seq is acknowledged
            block = await source.block(seq)
            got.update(block)
            # Never an old chunk's tail kept beside the new chunk.
            assert source.held_bytes() <= chunk // blksize * (blksize + 4)
            if len(block) < blksize:
                break
            seq += 1
    finally:
        source.close()
        handle.close()
    assert got.hexdigest() == hashlib.sha256(data).hexdigest()
    assert seq == len(data) // blksize + 1


async def _lock_step(source: BlockSource,
                     blksize: int) -> AsyncIterator[tuple[int, memoryview]]:
    """Every block's frame as a lock-step transfer takes them from ``source.poll``: each
    acknowledged before the next is asked, waiting for ``on_ready`` when a chunk is still
    being read, up to the short last one."""
    seq = 1
    while True:
        ready = trio.Event()
        source.on_ready = ready.set
        frame = source.poll(seq)
        if frame is None:  # the next chunk is being read: on_ready says when
            with trio.fail_after(5):
                await ready.wait()
            continue
        yield seq, frame
        if len(frame) < blksize + 4:
            return
        seq += 1
        source.release_before(seq)


@pytest.mark.parametrize("threads_free", [True, False])
async def test_read_ahead_comes_back_whether_a_read_thread_is_free_or_not(
        tmp_path: Path, threads_free: bool) -> None:
    """A read-ahead takes a free read thread without a task (offload.start); when every
    thread is busy it waits for one in a task.  Either way on_ready fires once the chunk is
    in, and the blocks are the file's bytes."""
    data = os.urandom(300_000)
    handle = _handle_on(tmp_path, data)
    limiter = trio.CapacityLimiter(1)
    holder = object()
    if not threads_free:
        limiter.acquire_on_behalf_of_nowait(holder)  # the one read thread is busy
    source = BlockSource(handle, 1428, 64 * 1024, limiter)
    ready = trio.Event()
    source.on_ready = ready.set
    got = hashlib.sha256()
    try:
        async with trio.open_nursery() as nursery:
            source.start_prefetch(nursery.start_soon)
            await trio.sleep(0.1)
            assert ready.is_set() == threads_free
            if not threads_free:
                limiter.release_on_behalf_of(holder)
            with trio.fail_after(5):
                await ready.wait()
            async for seq, frame in _lock_step(source, 1428):
                assert bytes(frame[:4]) == bytes([0, 3, (seq >> 8) & 0xFF, seq & 0xFF])
                got.update(frame[4:])
    finally:
        source.close()
        handle.close()
    assert got.hexdigest() == hashlib.sha256(data).hexdigest()
    assert limiter.borrowed_tokens == 0


async def test_a_lock_step_transfer_reads_into_two_buffers_in_turn(tmp_path: Path) -> None:
    """With read-ahead, a chunk is read into the buffer of the chunk before the current one,
    once all of it is acknowledged: a transfer of many chunks uses two buffers (no fresh
    allocation, so no page faults, per chunk), and the frames are still the file."""
    data = os.urandom(1_000_000)
    handle = _handle_on(tmp_path, data)
    source = BlockSource(handle, 1428, 64 * 1024, trio.CapacityLimiter(2))
    buffers: dict[int, object] = {}  # held: an id is not reused while its object lives
    got = hashlib.sha256()
    blocks = 0
    try:
        async with trio.open_nursery() as nursery:
            source.start_prefetch(nursery.start_soon)
            async for seq, frame in _lock_step(source, 1428):
                buffers[id(frame.obj)] = frame.obj
                got.update(frame[4:])
                blocks = seq
    finally:
        source.close()
        handle.close()
    assert got.hexdigest() == hashlib.sha256(data).hexdigest()
    assert blocks > 10 * chunk_size(64 * 1024, 1428) // 1428  # many chunks
    assert len(buffers) == 2


def _expected_frames(data: bytes, blksize: int, first: int, last: int) -> list[bytes]:
    """What a window of blocks ``first..last`` is on the wire, from the file's bytes."""
    frames = []
    for seq in range(first, last + 1):
        payload = data[(seq - 1) * blksize:seq * blksize]
        frames.append(bytes([0, 3, (seq >> 8) & 0xFF, seq & 0xFF]) + payload)
        if len(payload) < blksize:
            break
    return frames


def _frames(runs: list, blksize: int) -> list[bytes]:
    """The datagrams in ``runs`` (views of whole frames, the last maybe short)."""
    seg = blksize + 4
    return [bytes(run[o:o + seg]) for run in runs for o in range(0, len(run), seg)]


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 9000), blksize=st.sampled_from([8, 512, 1428]),
       windows=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 16)), max_size=12))
def test_gather_is_poll_block_by_block(size: int, blksize: int,
                                       windows: list[tuple[int, int]]) -> None:
    """A window gathered in one call is the same headers and payloads as polling each block
    (wherever it starts: block 1, mid-file, at or past the short last block)."""
    data = bytes(random.Random(size).randrange(256) for _ in range(size))
    source = BlockSource(None, blksize, 4096, trio.CapacityLimiter(1), whole_file=data)
    n_blocks = size // blksize + 1
    for first, width in windows:
        first = min(first, n_blocks)
        last = first + width - 1
        runs: list = []
        n, final = source.gather(first, last, runs)
        want = _expected_frames(data, blksize, first, last)
        assert _frames(runs, blksize) == want
        assert n == len(want)
        assert final == (len(want[-1]) - 4 < blksize)


@pytest.mark.parametrize("windowsize", [4, 16])
async def test_gathered_windows_across_read_ahead_chunks_are_the_file(
        tmp_path: Path, windowsize: int) -> None:
    """Windows gathered from a file read ahead in chunks (windows of several widths, so some
    straddle two chunks and some wait for the next one) are the file's bytes, and the last
    block ends the transfer."""
    data = os.urandom(150_000)
    handle = _handle_on(tmp_path, data)
    blksize = 1000
    source = BlockSource(handle, blksize, 20_000, trio.CapacityLimiter(2),
                         windowsize=windowsize)
    ready = trio.Event()
    source.on_ready = ready.set
    got = []
    try:
        async with trio.open_nursery() as nursery:
            source.start_prefetch(nursery.start_soon)
            first = 1
            widths = itertools.cycle([windowsize, 5, windowsize, 3])  # straddle chunk ends
            width = next(widths)
            while True:
                runs: list = []
                n, final = source.gather(first, first + width - 1, runs)
                frames = _frames(runs, blksize)
                assert n == len(frames)
                got += frames
                first += len(frames)
                source.release_before(first)  # the window is acknowledged
                width = next(widths)
                if final:
                    break
                if not frames:  # the next chunk is being read: on_ready says when
                    with trio.fail_after(5):
                        await ready.wait()
                    ready = trio.Event()
                    source.on_ready = ready.set
    finally:
        source.close()
        handle.close()
    assert got == _expected_frames(data, blksize, 1, len(data) // blksize + 1)


@settings(max_examples=40, deadline=None)
@given(chunks=st.integers(0, 3), extra=st.sampled_from([0, 1, 7, -1]),
       blksize=st.sampled_from([8, 512, 1000]), netascii=st.booleans(),
       width=st.integers(1, 40), acks=st.lists(st.floats(0, 1), min_size=1, max_size=8),
       seed=st.integers(0, 2**16))
def test_read_ahead_frames_are_the_file_whatever_is_acknowledged(
        tmp_path_factory: pytest.TempPathFactory, chunks: int, extra: int, blksize: int,
        netascii: bool, width: int, acks: list[float], seed: int) -> None:
    """Files of whole chunks (then the last block is an empty frame of its own chunk), one
    byte more or less, in octet and netascii (CR and LF bytes grow the stream across chunk
    ends), sent in windows that the client acknowledges only in part: every frame resent
    from an older chunk (copied out of its buffer when the next chunk became current) is
    still the file's block with its number, and the last frame ends it."""
    chunk = chunk_size(4096, blksize)
    size = max(0, chunks * chunk + extra)
    rnd = random.Random(seed)
    data = bytes(rnd.choice(b"ab\r\n\0") for _ in range(size))
    path = tmp_path_factory.mktemp("f") / "f"
    path.write_bytes(data)
    stream = netascii_encode(data) if netascii else data
    want = _expected_frames(stream, blksize, 1, len(stream) // blksize + 1)
    fractions = itertools.cycle(acks)

    async def main() -> list[tuple[int, bytes]]:
        fd = os.open(path, os.O_RDONLY)
        st_ = os.fstat(fd)
        handle = FileHandle(fd, expect=(st_.st_size, st_.st_mtime_ns))
        source = BlockSource(handle, blksize, 4096, trio.CapacityLimiter(2),
                             netascii=netascii, windowsize=width)
        got: list[tuple[int, bytes]] = []
        ready = trio.Event()
        source.on_ready = ready.set
        try:
            async with trio.open_nursery() as nursery:
                source.start_prefetch(nursery.start_soon)
                base = 1
                while True:
                    runs: list = []
                    n, final = source.gather(base, base + width - 1, runs)
                    frames = _frames(runs, blksize)
                    assert n == len(frames)
                    got += [(base + i, f) for i, f in enumerate(frames)]
                    if final:
                        break
                    if not frames:
                        with trio.fail_after(5):
                            await ready.wait()
                        ready = trio.Event()
                        source.on_ready = ready.set
                        continue
                    # The client acknowledges part of the window; the rest is sent again.
                    base += max(1, round(next(fractions) * n))
                    source.release_before(base)
                    if rnd.random() < 0.5:  # a read-ahead may finish mid-chunk
                        await trio.sleep(0.0005)
        finally:
            source.close()
            handle.close()
        return got

    got = trio.run(main)
    for seq, frame in got:
        assert frame == want[seq - 1], seq
    assert got[-1][0] == len(want)
