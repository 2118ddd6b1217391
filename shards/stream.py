"""Reading one sample ``(shard, index-in-shard)`` out of WebDataset tars, local or remote.

The loader decides a global sample order itself (see loader.py), so it needs "give me sample i of shard s":
- local tar files: the tar headers are scanned once (``tarfile`` seeks over member data, so this reads ~512 bytes
  per member) into an index of (key, member, offset, size); samples are then read with ``os.pread``. Each
  rank/worker reads only the bytes of its own samples: no read amplification however many consumers there are.
- anything else ``webdataset.gopen`` opens (``pipe:aws s3 cp ... -``, ``http://``, ``gs://``, ...): the shard is
  streamed once through webdataset's tar iterator and its samples kept in a small LRU of whole shards. Streams
  cannot seek, so each consumer that needs a sample of that shard reads the whole shard; keep
  ``shuffle_window_shards`` small for remote data (each consumer then touches few shards at a time).

Sample grouping follows webdataset exactly (key = member path up to the first dot of its base name), so a shard that
plain ``wds.WebDataset`` reads is read the same way here.
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass

from medfm.shards.corrupt import ReadError


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def split_member(name: str) -> tuple[str | None, str | None]:
    """webdataset's ``base_plus_ext``: ``"dir/abc-1.meta.json" -> ("dir/abc-1", "meta.json")``."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:  # no dot, or an empty base name
        return None, None
    return name[:dot], name[dot + 1:]


@dataclass
class TarIndex:
    """Per sample: key and [(member suffix, data offset, size)]; ``error`` = why the index stops early."""

    samples: list[tuple[str, list[tuple[str, int, int]]]]
    error: tuple[str, str] | None = None


def index_tar(path: str) -> TarIndex:
    """Scan the headers of a local tar. A truncated tar yields the complete samples before the cut."""
    try:
        size = os.path.getsize(path)
        tf = tarfile.open(path, mode="r:")
    except FileNotFoundError:
        raise ReadError("missing_shard", f"{path}: no such file") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ReadError("unreadable_shard", f"{path}: {exc.__class__.__name__}: {exc}") from None
    samples: list[tuple[str, list[tuple[str, int, int]]]] = []
    error = None
    try:
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                error = ("truncated", f"{path}: {exc.__class__.__name__}: {exc}")
                break
            if info is None:
                break
            if not info.isreg():
                continue
            key, suffix = split_member(info.name)
            if key is None or not suffix:
                continue
            if info.offset_data + info.size > size:
                error = ("truncated", f"{path}: member {info.name} ends past the end of the file")
                break
            if samples and samples[-1][0] == key:
                samples[-1][1].append((suffix.lower(), info.offset_data, info.size))
            else:
                samples.append((key, [(suffix.lower(), info.offset_data, info.size)]))
            tf.members = []  # don't keep every TarInfo alive
        if error is None and samples:
            # tarfile treats a header cut short as a clean end of archive; a complete tar ends with two zero
            # blocks after the last member, so a file without them was cut (possibly inside the last sample).
            _, members = samples[-1]
            _, offset, nbytes = members[-1]
            if size < offset + -(-nbytes // 512) * 512 + 1024:
                error = ("truncated", f"{path}: no end-of-archive marker (file cut after {len(samples)} samples)")
    finally:
        tf.close()
    if error is not None and samples:
        samples.pop()  # the last sample may have lost members after the cut: don't hand out half a sample
    return TarIndex(samples, error)


def _stream_shard(url: str) -> TarIndex | list[dict]:
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    out: list[dict] = []
    try:
        stream = wds.gopen(url, "rb")
    except Exception as exc:  # gopen raises many types (OSError, ValueError for unknown schemes, ...)
        raise ReadError("missing_shard", f"{url}: {exc.__class__.__name__}: {exc}") from None
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            sample.pop("__url__", None)
            out.append(sample)
    except Exception as exc:
        if not out:
            raise ReadError("unreadable_shard", f"{url}: {exc.__class__.__name__}: {exc}") from None
        out.pop()  # possibly incomplete
        out.append({"__error__": ("truncated", f"{url}: {exc.__class__.__name__}: {exc}")})
    finally:
        try:
            stream.close()
        except Exception:  # a pipe whose command failed reports it on close; the samples read so far stand
            pass
    return out


class ShardReader:
    """``reader.read(url, index) -> {"__key__": key, "meta.json": bytes, ...}`` or ReadError.

    Keeps up to ``max_open`` local files open, the header index of up to ``max_indexed`` local shards (a full
    shuffle over more shards than that re-scans headers: correct, slower; use ``shuffle_window_shards``), and
    ``max_cached`` streamed remote shards in memory (all LRU). Not shared between processes: each DataLoader worker
    builds its own.
    """

    def __init__(self, max_open: int = 64, max_indexed: int = 1024, max_cached: int = 4):
        self.max_open = max_open
        self.max_indexed = max_indexed
        self.max_cached = max_cached
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._index: OrderedDict[str, TarIndex] = OrderedDict()
        self._remote: OrderedDict[str, list[dict]] = OrderedDict()
        self._failed: dict[str, ReadError] = {}

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._index.clear()
        self._remote.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _open_local(self, url: str) -> tuple[int, TarIndex]:
        fd, index = self._fds.get(url), self._index.get(url)
        if fd is not None and index is not None:
            self._fds.move_to_end(url)
            self._index.move_to_end(url)
            return fd, index
        if url in self._failed:
            raise self._failed[url]
        path = local_path(url)
        try:
            if index is None:
                index = index_tar(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._failed[url] = ReadError("missing_shard", f"{path}: no such file")
            raise self._failed[url] from None
        except ReadError as exc:
            self._failed[url] = exc  # a broken shard is reported per sample but scanned only once
            raise
        self._fds[url] = fd
        self._index[url] = index
        while len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        while len(self._index) > self.max_indexed:
            self._index.popitem(last=False)
        return fd, index

    def _open_remote(self, url: str) -> list[dict]:
        hit = self._remote.get(url)
        if hit is not None:
            self._remote.move_to_end(url)
            return hit
        if url in self._failed:
            raise self._failed[url]
        try:
            samples = _stream_shard(url)
        except ReadError as exc:
            self._failed[url] = exc
            raise
        self._remote[url] = samples
        while len(self._remote) > self.max_cached:
            self._remote.popitem(last=False)
        return samples

    def read(self, url: str, index: int, only: tuple[str, ...] | None = None) -> dict:
        """Members of sample ``index`` of shard ``url`` (``only``: just these member names, e.g. meta.json)."""
        if is_local(url):
            fd, tix = self._open_local(url)
            if index >= len(tix.samples):
                reason, msg = tix.error or ("truncated", f"{url}: holds {len(tix.samples)} samples, not {index + 1}")
                raise ReadError(reason, msg)
            key, members = tix.samples[index]
            out = {"__key__": key}
            for suffix, offset, size in members:
                if only is not None and suffix not in only:
                    continue
                data = os.pread(fd, size, offset)
                if len(data) != size:
                    raise ReadError("truncated", f"{url}: short read of {key}.{suffix}")
                out[suffix] = data
            return out
        samples = self._open_remote(url)
        if index < len(samples) and "__error__" not in samples[index]:
            return dict(samples[index])
        if samples and "__error__" in samples[-1]:
            raise ReadError(*samples[-1]["__error__"])
        raise ReadError("truncated", f"{url}: holds {len(samples)} samples, not {index + 1}")

    def count(self, url: str) -> int:
        """Complete samples in a shard (scans it if needed)."""
        if is_local(url):
            return len(self._open_local(url)[1].samples)
        return sum("__error__" not in s for s in self._open_remote(url))
