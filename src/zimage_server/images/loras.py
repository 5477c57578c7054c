"""Which LoRA adapter a request names, checked before anything is billed. No torch here.

A request's ``loras[i].path`` is an installed adapter (a ``.safetensors`` file or a folder
under ``ZIMAGE_LORA_DIR``), a Hugging Face repo id already in the local cache, or, where
the operator allows it, an HTTPS URL (``images/lora_download.py``). Each becomes a
``LoraRef``: a local safetensors file whose header was read (no tensors) to refuse
what cannot work: pickles, other files, adapters too large or of too high a rank. Whether
its layers fit the model is only known by loading it; the worker reports that as a 400.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from zimage_server.core.config import Settings
from zimage_server.core.errors import InvalidRequest
from zimage_server.engine.protocol import LoraRef
from zimage_server.images.lora_download import LoraDownloader, Refusal
from zimage_server.outbound import Destination
from zimage_server.protocol.segmind import LoraEntry

SUFFIX = ".safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME = re.compile(rf"{_PART}(/{_PART})*")
_WEIGHT = re.compile(_PART)
_RANK_KEYS = (".lora_A.", ".lora_down.", "lora_A.weight", "lora_down.weight")


@dataclass(frozen=True, slots=True)
class InstalledLora:
    """One adapter of ``GET /v1/loras``."""

    name: str
    size_bytes: int


def refuse(index: int, name: str, reason: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid 'loras[{index}].path': adapter '{name[:120]}' {reason}.", field="loras"
    )


def is_url(path: str) -> bool:
    return path.lower().startswith(("http://", "https://"))


class LoraCatalog:
    """Installed adapters, and the checks every adapter of a request passes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.loras_dir
        self.downloads = LoraDownloader(settings) if settings.lora_allow_urls else None

    def installed(self) -> list[InstalledLora]:
        """Every ``.safetensors`` under the folder (a folder with one counts once, by name)."""
        if not self.root.is_dir():
            return []
        found: dict[str, InstalledLora] = {}
        for file in sorted(self.root.rglob("*" + SUFFIX)):
            relative = file.relative_to(self.root)
            name = relative.with_suffix("").as_posix()
            if file.name == DIFFUSERS_FILE and len(relative.parts) > 1:
                name = relative.parent.as_posix()
            if _NAME.fullmatch(name):
                found.setdefault(name, InstalledLora(name, file.stat().st_size))
        return list(found.values())

    @contextmanager
    def holding(self, entries: Sequence[LoraEntry]) -> Iterator[None]:
        """Keep the files of the adapters named by URL while a render uses them."""
        urls = [entry.path for entry in entries if is_url(entry.path)]
        downloads = self.downloads
        with downloads.holding(urls) if downloads and urls else nullcontext():
            yield

    def check_count(self, entries: Sequence[LoraEntry]) -> None:
        limit = self.settings.max_loras
        if len(entries) > limit:
            allowed = "LoRAs are off on this server" if limit == 0 else f"at most {limit}"
            raise InvalidRequest(
                f"Invalid 'loras': {allowed} (ZIMAGE_MAX_LORAS); got {len(entries)}.",
                field="loras",
            )

    def resolve_local(self, index: int, entry: LoraEntry) -> LoraRef:
        """An installed adapter, a cached repo, or a URL's download (``fetch`` first)."""
        name = entry.path
        if is_url(name):
            return self.checked(index, name, self._downloaded(index, name), entry.scale)
        if entry.weight_name is not None and not _WEIGHT.fullmatch(entry.weight_name):
            raise refuse(index, name, "has an invalid weight_name (a plain file name)")
        if not _NAME.fullmatch(name) or ".." in name.split("/"):
            raise refuse(
                index,
                name,
                "is not a valid name: use an installed adapter's name (letters, digits, "
                "'.', '_', '-', folders with '/'; see GET /v1/loras), a Hugging Face repo "
                "id, or an https:// URL",
            )
        file = self._installed_file(index, name, entry.weight_name) or self._cached_repo(
            index, name, entry.weight_name
        )
        if file is None:
            raise refuse(
                index,
                name,
                "is not installed on this server (GET /v1/loras lists those that are) and "
                "is not a Hugging Face repo in its cache",
            )
        return self.checked(index, name, file, entry.scale)

    def check_url(self, index: int, url: str) -> LoraDownloader:
        """What needs no DNS: URLs on, https, and not a refused literal address."""
        if self.downloads is None:
            raise refuse(
                index, url, "is a URL, and URLs are off on this server (ZIMAGE_LORA_ALLOW_URLS)"
            )
        destination = Destination.parse(url, f"loras[{index}].path")
        if destination.url.scheme != "https":
            raise refuse(index, url, "must be an https:// URL")
        try:
            self.downloads.policy.check(url)
        except InvalidRequest as exc:
            raise refuse(
                index, url, "is refused: " + exc.message.split(": ", 1)[-1].rstrip(".")
            ) from None
        return self.downloads

    async def fetch(self, index: int, entry: LoraEntry) -> None:
        """Download a URL's adapter unless it is on disk; other paths are local."""
        if not is_url(entry.path):
            return
        downloads = self.check_url(index, entry.path)
        try:
            await downloads.fetch(entry.path)
        except Refusal as exc:
            raise refuse(index, entry.path, exc.reason) from None

    def _downloaded(self, index: int, url: str) -> Path:
        file = self.check_url(index, url).cached(url)
        if file is None:
            raise refuse(index, url, "has not been downloaded")
        return file

    def _installed_file(self, index: int, name: str, weight_name: str | None) -> Path | None:
        root = self.root
        for candidate in (root / name, root / (name + SUFFIX)):
            if candidate.is_dir():
                return _file_in(index, name, candidate, weight_name)
            if candidate.is_file():
                return candidate
        for pickle in PICKLES:
            if (root / (name + pickle)).is_file():
                return root / (name + pickle)  # refused by ``checked``, with the reason
        return None

    def _cached_repo(self, index: int, name: str, weight_name: str | None) -> Path | None:
        """A repo id found in the local Hugging Face cache: nothing is downloaded."""
        if name.count("/") != 1:
            return None
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = snapshot_download(name, local_files_only=True)
        except (LocalEntryNotFoundError, ValueError, OSError):
            return None
        return _file_in(index, name, Path(folder), weight_name)

    def checked(self, index: int, name: str, file: Path, scale: float) -> LoraRef:
        """The file as a ``LoraRef``, if it is a safetensors LoRA this server can take."""
        if file.suffix != SUFFIX:
            raise refuse(
                index,
                name,
                f"is a '{file.suffix or 'plain'}' file: only .safetensors adapters are accepted "
                "(pickle formats such as .bin, .pt or .ckpt never are)",
            )
        stat = file.stat()
        limit = self.settings.lora_max_bytes
        if stat.st_size > limit:
            raise refuse(
                index, name, f"is {stat.st_size} bytes; at most {limit} (ZIMAGE_LORA_MAX_BYTES)"
            )
        check_header(index, name, file, self.settings.lora_max_rank)
        identity = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        return LoraRef(name=name, path=str(file), identity=identity, scale=float(scale))


def _file_in(index: int, name: str, folder: Path, weight_name: str | None) -> Path:
    """The adapter file of a folder: ``weight_name``, diffusers' name, or its only one."""
    if weight_name is not None:
        if not (folder / weight_name).is_file():
            raise refuse(index, name, f"has no file '{weight_name}'")
        return folder / weight_name
    if (folder / DIFFUSERS_FILE).is_file():
        return folder / DIFFUSERS_FILE
    files = sorted(folder.glob("*" + SUFFIX))
    if len(files) != 1:
        some = "several .safetensors files" if files else "no .safetensors file"
        raise refuse(index, name, f"is a folder with {some}: name one with 'weight_name'")
    return files[0]


def check_header(index: int, name: str, file: Path, max_rank: int) -> None:
    """Read the safetensors header only: a LoRA's keys, and ranks within the slots'."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as reader:
            keys = list(reader.keys())
            ranks = [
                reader.get_slice(key).get_shape()[0]
                for key in keys
                if any(mark in key for mark in _RANK_KEYS)
            ]
    except (SafetensorError, OSError, ValueError) as exc:
        raise refuse(index, name, f"is not a valid safetensors file ({exc})") from None
    if not ranks:
        raise refuse(index, name, "has no LoRA weights (lora_A/lora_B or lora_down/lora_up)")
    if max(ranks) > max_rank:
        raise refuse(
            index,
            name,
            f"has rank {max(ranks)}; this server takes at most {max_rank} (ZIMAGE_LORA_MAX_RANK)",
        )
