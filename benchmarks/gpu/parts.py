"""A file in parts small enough for the device tool's carry limit, with a manifest of sha256 sums; stdlib only.

Here (benchmarks/gpu/pack_wheel.py): `split(archive, folder, part_bytes, **info)` writes folder/part-NN and
folder/manifest.json. There (receive_part.sh, device_run.sh):

    python3 benchmarks/gpu/parts.py receive .gpu/sm90/part-00   # copy one part (and its manifest) to the work folder
    python3 benchmarks/gpu/parts.py install SITE                # verify all parts, unpack the archive into SITE

The work folder is $LOWBIT_GPU_WORK (default /tmp/lowbit-gpu); each pack (manifest "name") gets packs/NAME/ there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

MANIFEST = "manifest.json"
INSTALLED = "lowbit-gpu-pack.json"  # the manifest of the pack unpacked into a site folder (check_cuda.py reads it)
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def split(archive: Path, folder: Path, part_bytes: int, **info) -> dict:
    """Cut `archive` into folder/part-00, part-01, ... of at most `part_bytes` each; writes and returns the
    manifest (name = the folder's name, the archive's and every part's size and sha256, plus `info`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*"):
        old.unlink()
    parts, whole = [], hashlib.sha256()
    with open(archive, "rb") as f:
        while block := f.read(part_bytes):
            whole.update(block)
            path = folder / f"part-{len(parts):02d}"
            path.write_bytes(block)
            parts.append({"file": path.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    manifest = {"name": folder.name, "archive": archive.name, "bytes": archive.stat().st_size,
                "sha256": whole.hexdigest(), "parts": parts, **info}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def work_dir() -> Path:
    return Path(os.environ.get("LOWBIT_GPU_WORK", "/tmp/lowbit-gpu"))


def receive(part: Path, work: Path) -> dict:
    """Copy `part` and the manifest beside it into work/packs/NAME/, check the part's sha256 and print which parts
    of the pack are there. Returns {"name", "have", "missing"}; raises ValueError on a bad part."""
    manifest = json.loads((part.parent / MANIFEST).read_text())
    entry = next((p for p in manifest["parts"] if p["file"] == part.name), None)
    if entry is None:
        raise ValueError(f"{part.name} is not in {part.parent / MANIFEST}")
    dest = work / "packs" / manifest["name"]
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(part.parent / MANIFEST, dest / MANIFEST)
    if sha256_file(part) != entry["sha256"]:
        raise ValueError(f"{part}: sha256 differs from the manifest's (a truncated carry?)")
    shutil.copyfile(part, dest / part.name)
    state = pack_state(dest)
    print(f"received {part.name} ({entry['bytes'] / 2**20:.1f} MiB) of pack {manifest['name']}: "
          f"have {len(state['have'])}/{len(manifest['parts'])}"
          + (f", missing {' '.join(state['missing'])}" if state["missing"] else ", complete"))
    return state


def pack_state(folder: Path) -> dict:
    """Which parts of the pack in `folder` are present with the right size (sha256 is checked at install)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    have, missing = [], []
    for p in manifest["parts"]:
        path = folder / p["file"]
        (have if path.is_file() and path.stat().st_size == p["bytes"] else missing).append(p["file"])
    return {"name": manifest["name"], "have": have, "missing": missing}


def complete_pack(work: Path) -> Path:
    """The received pack whose parts are all there (the newest manifest if several are)."""
    packs = sorted((m.parent for m in (work / "packs").glob(f"*/{MANIFEST}") if not pack_state(m.parent)["missing"]),
                   key=lambda d: (d / MANIFEST).stat().st_mtime)
    if not packs:
        found = [f"{s['name']}: missing {' '.join(s['missing'])}"
                 for s in (pack_state(m.parent) for m in (work / "packs").glob(f"*/{MANIFEST}"))]
        raise ValueError(f"no complete pack under {work / 'packs'} ({'; '.join(found) or 'none received'})")
    return packs[-1]


class _Joined:
    """The parts read one after another as one stream, hashed as they are read."""

    def __init__(self, paths: list[Path]):
        self.paths, self.file, self.digest = list(paths), None, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        while True:
            if self.file is None:
                if not self.paths:
                    return b""
                self.file = open(self.paths.pop(0), "rb")
            block = self.file.read(size if size is not None and size >= 0 else -1)
            if block:
                self.digest.update(block)
                return block
            self.file.close()
            self.file = None


def unpack(pack: Path, site: Path) -> dict:
    """Check every part's sha256, unpack the archive they make up (tar.xz) into `site` and check the archive's
    sha256. Returns the manifest. The files go to a staging folder first and are moved in when all is well."""
    manifest = json.loads((pack / MANIFEST).read_text())
    for p in manifest["parts"]:
        if sha256_file(pack / p["file"]) != p["sha256"]:
            raise ValueError(f"{pack / p['file']}: sha256 differs from the manifest's")
    staging = site.parent / f".{site.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    stream = _Joined([pack / p["file"] for p in manifest["parts"]])
    with tarfile.open(fileobj=stream, mode="r|xz") as tar:
        tar.extractall(staging, filter="data")
    while stream.read(CHUNK):  # the archive's tail after the tar end marker
        pass
    if stream.digest.hexdigest() != manifest["sha256"]:
        shutil.rmtree(staging)
        raise ValueError(f"pack {manifest['name']}: the joined parts' sha256 differs from the manifest's")
    site.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        target = site / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        entry.rename(target)
    staging.rmdir()
    shutil.copyfile(pack / MANIFEST, site / INSTALLED)
    return manifest


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "receive":
        receive(Path(argv[1]), work_dir())
    elif len(argv) == 2 and argv[0] == "install":
        pack = complete_pack(work_dir())
        manifest = unpack(pack, Path(argv[1]))
        print(f"installed pack {manifest['name']} ({manifest['bytes'] / 2**20:.1f} MiB in {len(manifest['parts'])} "
              f"parts, sha256 ok) into {argv[1]}: {manifest.get('wheel', '')}")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
