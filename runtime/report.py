"""`lowbit report`: converted folders side by side (size, perplexity, KL to a reference, speed) as one
self-contained HTML page, plus the raw numbers as JSON.

Quality is `evaluate.perplexity` with the reference session: each window's logits
are scored and dropped, so memory does not grow with the text. With a reference folder, its forward
pass runs on the same window beside each folder's (two models loaded at most), and every scored
position adds KL(P_reference || P_folder) and whether both argmaxes agree. Speed is `bench.benchmark`.
matplotlib (the `report` extra) is imported only to draw the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime.bench import benchmark, model_bytes
from lowbit.runtime.evaluate import check_windows, perplexity
from lowbit.runtime.session import create_session
from lowbit.runtime.tokenizer import load_tokenizer

GENERATOR = "lowbit report"  # marks the files we write: only those are ever replaced
INSTALL_HINT = "lowbit report draws its plots with matplotlib, which is not installed: pip install 'lowbit[report]'"


@dataclass(frozen=True)
class FolderResult:
    label: str
    folder: str
    scheme: str
    model_bytes: int
    perplexity: float
    tokens: int
    windows: int
    kl: float | None
    kl_p99: float | None
    top1: float | None
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    is_reference: bool = False


@dataclass(frozen=True)
class Report:
    results: list[FolderResult]
    data: str
    reference: str | None
    settings: dict
    machine: dict = field(default_factory=dict)
    date: str = ""
    command: str = ""

    def as_dict(self) -> dict:
        return {"generator": GENERATOR, **asdict(self)}


@dataclass(frozen=True)
class _Folder:
    path: Path
    scheme: str
    vocab_size: int
    context_length: int


def _open_folder(folder: Path) -> _Folder:
    """What the report needs to know before loading anything: a LowbitError for a folder it cannot use."""
    if not (folder / "model.onnx").is_file():
        raise LowbitError(f"{folder}: no model.onnx (is this a `lowbit convert` output folder?)")
    try:
        config = json.loads((folder / "genai_config.json").read_text())["model"]
        vocab, context = int(config["vocab_size"]), int(config["context_length"])
    except (OSError, ValueError, KeyError, TypeError):
        raise LowbitError(f"{folder}: no readable genai_config.json (is this a `lowbit convert` output folder?)") \
            from None
    scheme = "?"
    try:
        scheme = str(json.loads((folder / "lowbit.json").read_text()).get("scheme", "?"))
    except (OSError, ValueError, AttributeError):
        pass
    return _Folder(folder, scheme, vocab, context)


def _labels(folders: list[Path]) -> list[str]:
    names = [f.name or str(f) for f in folders]
    return [n if names.count(n) == 1 else str(f) for n, f in zip(names, folders)]


def machine() -> dict:
    """Where the numbers were measured."""
    import onnxruntime

    import lowbit

    def first_line(path: str, key: str) -> str | None:
        try:
            with open(path) as f:
                return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), None)
        except OSError:
            return None

    memory = first_line("/proc/meminfo", "MemTotal")
    return {
        "host": platform.node(),
        "cpu": first_line("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory": f"{int(memory.split()[0]) / 2**20:.1f} GiB" if memory else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "lowbit": lowbit.__version__,
    }


def measure(folders, text: str, reference=None, *, data: str = "", seq_len: int | None = None,
            stride: int | None = None, max_tokens: int | None = None, prompt_len: int = 128, new_tokens: int = 64,
            repeats: int = 3, provider: str = "cpu", threads: int | None = None, command: str = "",
            progress=None, on_result=None) -> Report:
    """Measure each converted folder over `text` (see the module docstring). progress(iterable, label) wraps
    each folder's windows; on_result(FolderResult) is called as each folder finishes."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise LowbitError("no folders to report on")
    if not text.strip():
        raise LowbitError("the evaluation text is empty")
    infos = [_open_folder(f) for f in folders]
    ref_info = _open_folder(Path(reference)) if reference is not None else None
    base = ref_info or infos[0]
    seq_len = seq_len or min(2048, base.context_length)
    stride = stride or seq_len
    check_windows(2, seq_len, stride)
    for info in infos + ([ref_info] if ref_info else []):
        if seq_len > info.context_length:
            raise LowbitError(f"{info.path}: seq_len {seq_len} exceeds the model's context length "
                              f"({info.context_length})")
        if prompt_len + new_tokens > info.context_length:
            raise LowbitError(f"{info.path}: prompt_len + new_tokens ({prompt_len} + {new_tokens}) exceeds the "
                              f"model's context length ({info.context_length})")
        if ref_info and info.vocab_size != ref_info.vocab_size:
            raise LowbitError(f"{info.path}: a vocabulary of {info.vocab_size} tokens, the reference {ref_info.path} "
                              f"has {ref_info.vocab_size}: KL needs the same vocabulary")

    def encode(folder: Path) -> np.ndarray:
        ids = np.asarray(load_tokenizer(folder).encode(text), np.int64)[:max_tokens]
        if len(ids) < 2:
            raise LowbitError("the evaluation text has fewer than 2 tokens: nothing to score")
        return ids

    ref_ids = encode(ref_info.path) if ref_info else None
    token_ids = []
    for info in infos:
        ids = encode(info.path)
        if ref_ids is not None and not np.array_equal(ids, ref_ids):
            raise LowbitError(f"{info.path}: its tokenizer encodes the text differently from the reference "
                              f"{ref_info.path}: KL needs the same tokens")
        token_ids.append(ids)

    ref_session = create_session(ref_info.path, provider, threads) if ref_info else None
    results = []
    for info, label, ids in zip(infos, _labels(folders), token_ids):
        same = ref_info is not None and info.path.resolve() == ref_info.path.resolve()
        session = ref_session if same else create_session(info.path, provider, threads)
        wrap = (lambda it, label=label: progress(it, label)) if progress else None
        q = perplexity(session, ids, seq_len, stride, wrap, reference=ref_session)
        speed = benchmark(session, prompt_len, new_tokens, repeats)
        result = FolderResult(label, str(info.path), info.scheme, model_bytes(info.path), q.perplexity, q.tokens,
                              q.windows, q.kl, q.kl_p99, q.top1, speed.prefill_tokens_per_s,
                              speed.decode_tokens_per_s, same)
        results.append(result)
        if on_result:
            on_result(result)
        del session
    settings = dict(seq_len=seq_len, stride=stride, max_tokens=max_tokens, prompt_len=prompt_len,
                    new_tokens=new_tokens, repeats=repeats, provider=provider, threads=threads)
    return Report(results, data, str(reference) if reference is not None else None, settings, machine(),
                  datetime.now().astimezone().isoformat(timespec="seconds"), command)


# ---- the page ----

def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LowbitError(INSTALL_HINT) from None


def _figure(report: Report, panels: list[tuple[str, str]]) -> str:
    """One row of scatter plots against model size (MB): a base64 PNG."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(panels), 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, ylabel) in zip(axes, panels):
        for i, r in enumerate(report.results):
            x, y = r.model_bytes / 1e6, getattr(r, key)
            name = r.label if r.label == r.scheme else f"{r.label} ({r.scheme})"
            ax.scatter([x], [y], s=70, color=f"C{i % 10}", label=name, zorder=3)
            ax.annotate(name, (x, y), xytext=(6, 4), textcoords="offset points", fontsize=8)
        ax.set_xlabel("model size (MB, model.onnx*)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(left=0, right=max(r.model_bytes for r in report.results) / 1e6 * 1.25)
        ax.margins(y=0.2)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 22px; margin: 0 0 6px; } h2 { font-size: 17px; margin: 22px 0 8px; }
p, dl, pre, figcaption { font-size: 13px; }
figure { margin: 0 0 12px; } img { display: block; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; } dt { font-weight: 600; }
pre { background: #f6f6f6; padding: 8px; white-space: pre-wrap; overflow-wrap: break-word; }
"""


def render_html(report: Report) -> str:
    """The page: the two plots (inline base64 PNG), the table, machine, date and command; nothing external."""
    with_ref = report.reference is not None
    quality_panels = [("perplexity", "perplexity")]
    if with_ref:
        quality_panels.append(("kl", "mean KL to reference (nats/token)"))
    quality_png = _figure(report, quality_panels)
    speed_png = _figure(report, [("decode_tokens_per_s", "decode tok/s"), ("prefill_tokens_per_s", "prefill tok/s")])
    e = html.escape
    s = report.settings
    head = ["folder", "scheme", "size (MB)", "perplexity", "KL (nats/token)", "KL p99", "top-1 agreement",
            "prefill tok/s", "decode tok/s", "scored tokens"]
    rows = []
    for r in report.results:
        cells = [e(r.label) + (" (reference)" if r.is_reference else ""), e(r.scheme), f"{r.model_bytes / 1e6:.3f}",
                 f"{r.perplexity:.4f}", _number(r.kl, 5), _number(r.kl_p99, 5), _number(r.top1, 4),
                 f"{r.prefill_tokens_per_s:.1f}", f"{r.decode_tokens_per_s:.1f}", str(r.tokens)]
        rows.append("<tr>" + "".join(f'<td{" class=l" if i < 2 else ""}>{c}</td>' for i, c in enumerate(cells))
                    + "</tr>")
    machine = "".join(f"<dt>{e(str(k))}</dt><dd>{e(str(v))}</dd>" for k, v in report.machine.items())
    reference = (f"KL(reference ‖ folder) and top-1 agreement against <b>{e(report.reference)}</b>, at the same "
                 "positions; " if with_ref else "no reference folder (give --reference for KL and top-1); ")
    tokens = report.results[0].tokens if report.results else 0
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{GENERATOR}">
<title>lowbit report</title><style>{CSS}</style></head>
<body>
<h1>lowbit report: {len(report.results)} folder{"s" if len(report.results) != 1 else ""}</h1>
<p>Text <b>{e(report.data or "(given as text)")}</b>: {tokens} scored tokens in windows of {s["seq_len"]} tokens,
stride {s["stride"]}{f", first {s['max_tokens']} tokens" if s.get("max_tokens") else ""}; {reference}
speed: best of {s["repeats"]}, prompt {s["prompt_len"]} tokens, {s["new_tokens"]} decode steps, provider
{e(str(s["provider"]))}. Size: bytes of model.onnx and its external data.</p>
<h2>Size vs quality</h2>
<figure id="quality"><img alt="size vs quality" src="data:image/png;base64,{quality_png}">
<figcaption>x: model size; y: perplexity{" and mean KL to the reference" if with_ref else ""} (lower is better).
</figcaption></figure>
<h2>Size vs speed</h2>
<figure id="speed"><img alt="size vs speed" src="data:image/png;base64,{speed_png}">
<figcaption>x: model size; y: decode and prefill tokens per second (higher is better).</figcaption></figure>
<h2>Numbers</h2>
<table id="numbers"><thead><tr>{"".join(f'<th{" class=l" if i < 2 else ""}>{h}</th>' for i, h in enumerate(head))}
</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>
<h2>Machine</h2>
<dl>{machine}<dt>date</dt><dd>{e(report.date)}</dd></dl>
<h2>Command</h2>
<pre>{e(report.command or "(Python API)")}</pre>
</body></html>
"""


# ---- output files ----

def _ours(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}">' in head or f'"generator": "{GENERATOR}"' in head


def check_output(path: str | Path) -> Path:
    """An output file we may write: its folder exists; an existing file is one lowbit report wrote."""
    path = Path(path)
    if path.is_dir():
        raise LowbitError(f"{path}: is a folder, not a file name")
    if not path.parent.is_dir():
        raise LowbitError(f"{path.parent}: no such folder")
    if path.exists() and not _ours(path):
        raise LowbitError(f"{path}: exists and was not written by lowbit report; choose another name")
    return path


def write_files(files: dict[Path, str]) -> None:
    """Write each file to a temporary name beside it, then rename them all into place: all or nothing."""
    paths = [check_output(p) for p in files]
    if len({p.resolve() for p in paths}) != len(paths):
        raise LowbitError("the HTML and JSON outputs are the same file")
    staged = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, text in files.items():
            fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
            staged.append((tmp, path))
            os.chmod(tmp, 0o666 & ~umask)  # what open() would give; mkstemp makes it private
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_report(report: Report, html_path: str | Path, json_path: str | Path | None = None) -> None:
    files = {Path(html_path): render_html(report)}
    if json_path is not None:
        files[Path(json_path)] = json.dumps(report.as_dict(), indent=2) + "\n"
    write_files(files)
