"""Checkpoints: a run's whole state, written so that a crash at any moment leaves the last one whole.

A run's checkpoint directory is ``<checkpoint.path>/<run id>``, on a local disk or at any URI that
``pyarrow.fs`` (s3://, gs://, hdfs://, file://) or ``fsspec`` understands:

    run.npz                  the run's state at its last checkpointed round (the commit point)
    changes/<round>.npz      what the rounds up to <round> added: their log, and the device records
                             (and DP-SGD spends) they changed
    ledger/<round>.json      privacy spent in <round>, written before its devices trained
    authority/<id>.json      contributions the key authority decrypted (or refused), written before

Every file is written under a temporary name and then moved into place, and ``run.npz`` is written
last: change files of rounds after it are ignored when loading, so a crash while checkpointing
leaves the previous checkpoint usable. A checkpoint writes only what changed since the last, so
it costs O(sampled devices), whatever the number of devices or rounds. Files hold NumPy arrays and JSON, never pickles: loading a
checkpoint runs no code.
"""

from __future__ import annotations

import io
import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
RUN_FILE = "run.npz"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not belong to what resumes it; says which."""


def pack(tree: Any) -> bytes:
    """``tree`` (dicts with string keys, lists, JSON scalars and NumPy arrays) as one .npz."""
    arrays: dict[str, np.ndarray] = {}

    def encode(node: Any) -> Any:
        if isinstance(node, np.ndarray):
            name = f"a{len(arrays)}"
            arrays[name] = node
            return {"__array__": name}
        if isinstance(node, dict):
            return {str(k): encode(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [encode(v) for v in node]
        if isinstance(node, np.generic):
            return node.item()
        return node

    text = json.dumps(encode(tree)).encode()
    buffer = io.BytesIO()
    np.savez(buffer, __json__=np.frombuffer(text, dtype=np.uint8), **arrays)
    return buffer.getvalue()


def unpack(data: bytes) -> Any:
    """The tree ``pack`` wrote; raises CheckpointError if ``data`` is not one."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        tree = json.loads(arrays.pop("__json__").tobytes())
    except Exception as e:  # noqa: BLE001 - zipfile, numpy and json each raise their own
        raise CheckpointError(f"not a fedray checkpoint file ({type(e).__name__}: {e})") from None

    def decode(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"__array__"}:
                return arrays[node["__array__"]]
            return {k: decode(v) for k, v in node.items()}
        if isinstance(node, list):
            return [decode(v) for v in node]
        return node

    return decode(tree)


def filesystem(uri: str) -> tuple[Any, str]:
    """A ``pyarrow.fs.FileSystem`` and the path in it for ``uri`` (a relative local path is taken
    from the working directory); fsspec serves the schemes pyarrow does not know."""
    from pyarrow import fs

    if "://" not in uri:
        uri = str(Path(uri).resolve())
    try:
        return fs.FileSystem.from_uri(uri)
    except Exception:  # noqa: BLE001 - pyarrow raises ArrowInvalid or ArrowNotImplementedError
        import fsspec

        filesystem_, path = fsspec.core.url_to_fs(uri)
        return fs.PyFileSystem(fs.FSSpecHandler(filesystem_)), path


class CheckpointStore:
    """The checkpoint directory ``location`` (a URI or path) of one run."""

    def __init__(self, location: str) -> None:
        self.location = location
        self._fs, self._root = filesystem(location)
        self._writing: threading.Thread | None = None  # save_later's write in progress
        self._failed: BaseException | None = None
        self._folders: set[str] = set()  # made already

    @classmethod
    def of_run(cls, path: str, run_id: str) -> CheckpointStore:
        return cls(f"{path.rstrip('/')}/{run_id}")

    def exists(self) -> bool:
        from pyarrow import fs

        return self._fs.get_file_info(f"{self._root}/{RUN_FILE}").type == fs.FileType.File

    def save(self, state: dict, changed: dict) -> None:
        """Commit ``state`` (with its ``round``), and first ``changed``: what changed since the last
        checkpoint."""
        self._write(f"changes/{state['round']:09d}.npz", pack(changed))
        self._write(RUN_FILE, pack(state | {"format": FORMAT}))

    def save_later(self, state: dict, changes: Callable[[], dict]) -> None:
        """``save(state, changes())`` in a background thread, once the previous one has finished
        (raising its error, if it failed), so that a round waits neither for the disk nor for what
        ``changes`` fetches. ``state`` must not change after."""
        self.wait()
        self._writing = threading.Thread(target=self._save, args=(state, changes), name="fedray-checkpoint",
                                         daemon=True)
        self._writing.start()

    def _save(self, state: dict, changes: Callable[[], dict]) -> None:
        try:
            self.save(state, changes())
        except BaseException as e:  # noqa: BLE001 - raised by the next wait, in the caller's thread
            self._failed = e

    def wait(self) -> None:
        """Wait for the checkpoint being written; CheckpointError if it could not be."""
        if self._writing is not None:
            self._writing.join()
            self._writing = None
        failed, self._failed = self._failed, None
        if failed is not None:
            raise CheckpointError(f"cannot write the checkpoint to {self.location}: {type(failed).__name__}: "
                                  f"{failed}") from failed

    def load(self) -> tuple[dict, list[dict]]:
        """The committed state and, oldest first, the changes it includes."""
        data = self._read(RUN_FILE)
        if data is None:
            raise CheckpointError(f"no checkpoint at {self.location} (it holds no {RUN_FILE})")
        state = unpack(data)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{self.location}/{RUN_FILE} is not a fedray checkpoint of format {FORMAT}")
        changes = [unpack(self._read(f"changes/{r:09d}.npz")) for r in self._rounds("changes", ".npz")
                   if r <= state["round"]]
        return state, changes

    def charge(self, round: int, spent: dict) -> None:
        """Write ahead what ``round`` spends of the privacy budget (before its devices train), so
        that a resumed run counts a round that a crash cut short after it released something."""
        self._write(f"ledger/{round:09d}.json", json.dumps(spent).encode())

    def charges(self, after: int) -> list[tuple[int, dict]]:
        """The spends written ahead for rounds after ``after``, in round order."""
        return [(r, json.loads(self._read(f"ledger/{r:09d}.json"))) for r in self._rounds("ledger", ".json") if r > after]

    def record_decryption(self, contributions: list[tuple[int, int]]) -> None:
        """The key authority's write-ahead: the (device, round) contributions it is about to decrypt."""
        self._write(f"authority/{uuid.uuid4().hex}.json", json.dumps(contributions).encode())

    def decrypted(self) -> set[tuple[int, int]]:
        """Every contribution the run's key authorities ever decrypted or refused."""
        from pyarrow import fs

        selector = fs.FileSelector(f"{self._root}/authority", allow_not_found=True)
        spent = set()
        for info in self._fs.get_file_info(selector):
            if info.base_name.endswith(".json"):
                spent.update((d, r) for d, r in json.loads(self._read(f"authority/{info.base_name}")))
        return spent

    def _rounds(self, folder: str, suffix: str) -> list[int]:
        from pyarrow import fs

        selector = fs.FileSelector(f"{self._root}/{folder}", allow_not_found=True)
        names = [info.base_name for info in self._fs.get_file_info(selector)]
        return sorted(int(n[:-len(suffix)]) for n in names if n.endswith(suffix) and n[:-len(suffix)].isdigit())

    def _write(self, name: str, data: bytes) -> None:
        path = f"{self._root}/{name}"
        folder = path.rsplit("/", 1)[0]
        if folder not in self._folders:
            self._fs.create_dir(folder, recursive=True)
            self._folders.add(folder)
        temporary = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        with self._fs.open_output_stream(temporary) as out:
            out.write(data)
        self._fs.move(temporary, path)  # a rename on a local disk: atomic

    def _read(self, name: str) -> bytes | None:
        try:
            with self._fs.open_input_stream(f"{self._root}/{name}") as stream:
                return stream.read()
        except FileNotFoundError:
            return None
