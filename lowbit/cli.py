"""The `lowbit` command line."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

import click

from lowbit.errors import LowbitError


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which pass its comparisons)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class LowbitGroup(click.Group):
    """Turns LowbitError (bad input) into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LowbitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except click.UsageError as e:  # a bad option value of a command: the same one line
            command = f"{e.ctx.command_path}: " if e.ctx is not None and e.ctx is not ctx else ""
            click.echo(f"error: {command}{' '.join(e.format_message().split())}", err=True)
            sys.exit(2)


@click.group(cls=LowbitGroup)
@click.version_option(package_name="lowbit")
def main():
    """lowbit: Hugging Face language models -> (quantized) ONNX, and a runtime for them."""
    if threading.current_thread() is threading.main_thread():  # Python installs handlers from the main thread only
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    """`kill` (SIGTERM) stops a command as Ctrl-C does: the with/finally blocks run, so a conversion's temporary
    folders (the float model, the boundary cache: gigabytes for a 1B model) and its staging output are removed."""
    raise KeyboardInterrupt


def _keep_torch_out(model: str) -> None:
    """Conversion needs no torch, but transformers imports it whenever it is installed (~170 MB and
    ~2 s before the first tensor is read). Marking it absent for this process keeps it out, unless
    the checkpoint is pytorch_model.bin, which only torch reads."""
    from lowbit.converter.checkpoint import weight_format  # file names only: what the checkpoint declares

    path = Path(model)
    reads_bin = path.is_dir() and weight_format(path) == "bin"
    if not reads_bin and "torch" not in sys.modules and "transformers" not in sys.modules:
        sys.modules["torch"] = None
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _progress_callback():
    from tqdm import tqdm

    bar = None

    def callback(tensor, info):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=info.total, desc="writing weights", unit="tensor", leave=False, disable=None)
        bar.update()
        if bar.n >= bar.total:
            bar.close()

    return callback


def _calibration_progress(stage: str):
    """A tqdm bar over the calibration samples of one pass (`--algo gptq`: one pass per decoder layer)."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"calibrating {stage}", unit="sample", leave=False, disable=None)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--scheme", default=None,
              help="Quantization scheme (see docs/schemes.md) [default: q0f32, or what a GPTQ/AWQ/compressed-tensors "
                   "checkpoint implies].")
@click.option("--target", default="ort", show_default=True, type=click.Choice(["ort", "tensorrt"]))
@click.option("--group-size", type=click.IntRange(min=1), default=None,
              help="Group (block) size along K, for schemes that take one; a group larger than K is per-channel.")
@click.option("--symmetric/--asymmetric", default=None, help="Symmetric or asymmetric weights (generic schemes).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits accuracy_level of weight-only layers: 0 float activations, 4 (the default) int8.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=None, help="Compute dtype override.")
@click.option("--no-pad", is_flag=True, help="Reject layers whose K is not a multiple of the group instead of padding.")
@click.option("--clip-search", is_flag=True,
              help="Per group, shrink the range to the ratio (1.0 ... 0.5) with the least squared weight error.")
@click.option("--ignore", "ignore", multiple=True, metavar="PATTERN",
              help="Keep matching modules in float (repeatable): a glob or re:REGEX over module names, ours "
                   "(layers.0.mlp.down_proj) or transformers' (model.layers.0.mlp.down_proj, lm_head).")
@click.option("--algo", default="rtn", show_default=True, type=click.Choice(["rtn", "gptq", "awq"]),
              help="Weight algorithm: round to nearest, or GPTQ / AWQ calibrated through ONNX Runtime.")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None,
              help="Calibration text, JSONL or JSON (Alpaca, {text}, ShareGPT rows) [default: lowbit's own set].")
@click.option("--num-samples", default=128, show_default=True, type=click.IntRange(min=1),
              help="Calibration samples.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Tokens per calibration sample at most [default: min(512, context)].")
@click.option("--calib-seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Which samples, when the data holds more.")
@click.option("--damp", default=0.01, show_default=True, type=FiniteFloatRange(0, 1, max_open=True),
              help="GPTQ dampening, as a fraction of the Hessian's mean diagonal.")
@click.option("--act-order", is_flag=True,
              help="GPTQ: columns in order of decreasing Hessian diagonal (static groups).")
@click.option("--sequential/--independent", default=None,
              help="GPTQ/AWQ: calibrate each layer on the outputs of the quantized layers before it, or on "
                   "float inputs; a recipe's calibrated modifiers share one such pass, or get one each on the float "
                   "model [default: sequential].")
@click.option("--pipeline", type=click.Choice(["sequential", "independent"]), default=None,
              help="llm-compressor's name for --sequential / --independent.")
@click.option("--smoothquant-alpha", type=FiniteFloatRange(0, 1), default=None,
              help="SmoothQuant before quantizing (schemes with quantized activations): migration strength alpha, "
                   "scales folded into the norms and up_proj (0.5 is the paper's default).")
@click.option("--recipe", type=click.Path(path_type=Path), default=None,
              help="Quantization recipe (YAML/JSON, llm-compressor's format; docs/recipes.md) instead of --scheme.")
@click.option("--emit", metavar="FORMAT", default=None,
              help="Also write the quantized checkpoint in this format into OUT/<format>/ (compressed-tensors: "
                   "safetensors that compressed-tensors and vLLM load; needs --recipe).")
@click.option("--quant-config", type=click.Path(path_type=Path), default=None,
              help="DashInfer quantization config JSON (instead of --scheme).")
@click.option("--requantize", is_flag=True,
              help="Pre-quantized (GPTQ/AWQ/compressed-tensors) checkpoint for --target tensorrt: requantize "
                   "asymmetric weights to symmetric INT4 (the added error is reported) instead of refusing.")
@click.option("--overwrite", is_flag=True, help="Replace an output folder that lowbit wrote (it holds lowbit.json).")
def convert(model, output, scheme, target, group_size, symmetric, accuracy_level, dtype, no_pad, clip_search,
            ignore, algo, calib_data, num_samples, seq_len, calib_seed, damp, act_order, sequential, pipeline,
            smoothquant_alpha, recipe, emit, quant_config, requantize, overwrite):
    """Convert MODEL (a local HF folder or a hub id) into an ONNX folder."""
    _keep_torch_out(model)
    from lowbit.converter.api import convert as run_convert

    if pipeline is not None and sequential is not None and (pipeline == "sequential") != sequential:
        raise LowbitError(f"--pipeline {pipeline} contradicts --{'sequential' if sequential else 'independent'}")
    sequential = pipeline != "independent" if pipeline is not None else sequential is not False

    report = run_convert(model, output, scheme, target=target, group_size=group_size, symmetric=symmetric,
                         accuracy_level=accuracy_level, dtype=dtype, pad=not no_pad, clip_search=clip_search,
                         ignore=ignore, algo=algo, calib_data=calib_data, num_samples=num_samples, seq_len=seq_len,
                         calib_seed=calib_seed, damp=damp, act_order=act_order, sequential=sequential,
                         smoothquant_alpha=smoothquant_alpha, recipe=recipe, emit=emit,
                         calibration_progress=_calibration_progress,
                         quant_config=quant_config,
                         requantize=requantize, overwrite=overwrite, progress=_progress_callback())
    click.echo(
        f"wrote {report.output} ({report.model_type}, scheme {report.scheme}, target {report.target}): "
        f"{report.model_bytes / 1e6:.1f} MB in {report.seconds:.1f} s"
    )
    if report.quant is not None:
        layers = report.quant.layers
        worst = max(layers, key=lambda r: r.max_rel_error) if layers else None
        click.echo(
            f"weights {report.float_weight_bytes / 1e6:.2f} MB -> {report.weight_bytes / 1e6:.2f} MB; "
            f"{len(layers)} layers quantized"
            + (f"; max relative weight error {worst.max_rel_error:.4f} ({worst.module})" if worst else "")
        )
        if report.quant.ignored:
            click.echo(f"kept in float by --ignore: {', '.join(report.quant.ignored)}")
        for r in layers:
            shared = f" (shares {r.shares}'s tensors)" if r.shares else ""
            click.echo(f"  {r.module:32s} {r.quant:28s} {r.format:24s} max rel err {r.max_rel_error:.4f}{shared}")
    for note in report.notes:
        click.echo(note)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--calib-data", "--dataset", "calib_data", type=click.Path(path_type=Path), default=None,
              help="Calibration text, JSONL or JSON (Alpaca, {text}, ShareGPT rows) [default: lowbit's own set].")
@click.option("--num-samples", "--num-calibration-samples", "num_samples", default=128, show_default=True,
              type=click.IntRange(min=1), help="Calibration samples.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Tokens per calibration sample at most [default: min(512, context)].")
@click.option("--calib-seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Which samples, when the data holds more.")
def calibrate(model_dir, calib_data, num_samples, seq_len, calib_seed):
    """Measure the activation scales of a *_max_calibrate folder (max observers, ONNX Runtime) and write them in
    place: the folder becomes the final scheme (e4m3_e4m3_f16_max_calibrate -> e4m3_e4m3_f16)."""
    from lowbit.converter.calibration import CalibrationSettings
    from lowbit.converter.calibrate_folder import calibrate_folder

    record = calibrate_folder(model_dir, CalibrationSettings(calib_data, num_samples, seq_len, calib_seed),
                              _calibration_progress("activation scales"))
    click.echo(f"calibrated {model_dir} ({record['calibrated_scheme']}): {len(record['scales'])} activation scales "
               f"from {record['samples']} samples, {record['tokens']} tokens of {record['data']}")


def speed_options(command):
    """The benchmark flags shared by `bench` and `report`."""
    for option in reversed([
        click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(min=1)),
        click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=1)),
        click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1)),
        click.option("--threads", type=click.IntRange(1, 1024), default=None,
                     help="ORT intra-op threads [default: all cores]."),
    ]):
        command = option(command)
    return command


def sampling_options(command):
    """The sampling flags shared by `run` and `chat`."""
    for option in reversed([
        click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1)),
        click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "tensorrt"])),
        click.option("--sample", is_flag=True, help="Sample instead of greedy decoding."),
        click.option("--temperature", default=1.0, show_default=True, type=FiniteFloatRange(min=0, min_open=True)),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 disables top-k."),
        click.option("--top-p", default=1.0, show_default=True, type=FiniteFloatRange(0, 1, min_open=True)),
        click.option("--seed", type=click.IntRange(min=0), default=None),
    ]):
        command = option(command)
    return command


def _sampling(sample, temperature, top_k, top_p, seed) -> dict:
    return dict(do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeat for a batch).")
@click.option("--chat", "as_chat", is_flag=True, help="Format each prompt as a user turn with the chat template.")
@click.option("--system", default=None, help="System message for --chat.")
@sampling_options
def run(model_dir, prompts, as_chat, system, max_new_tokens, provider, sample, temperature, top_k, top_p, seed):
    """Generate text from a converted folder; one prompt streams as it is generated."""
    from lowbit.runtime.generate import SamplingConfig, generate_ids
    from lowbit.runtime.model import Model

    if system is not None and not as_chat:
        raise LowbitError("--system needs --chat")
    model = Model.load(model_dir, provider)
    tokenizer = model.tokenizer
    if as_chat:
        messages = [[{"role": "system", "content": system}] if system else [] for _ in prompts]
        texts = [tokenizer.apply_chat_template([*m, {"role": "user", "content": p}]) for m, p in zip(messages, prompts)]
        encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    else:
        encoded = [tokenizer.encode(p) for p in prompts]
    sampling = _sampling(sample, temperature, top_k, top_p, seed)
    if len(encoded) == 1:  # stream: the prompt's text, then each piece as its token arrives
        pieces = model.stream(encoded[0], max_new_tokens, **sampling)
        first = next(pieces, "")  # bad input (beyond the context, ...) is an error before anything is printed
        if not as_chat:
            click.echo(tokenizer.decode(encoded[0]), nl=False)
        for piece in itertools.chain([first], pieces):
            click.echo(piece, nl=False)
        click.echo()
        return
    config = SamplingConfig(max_new_tokens, **sampling)
    new = generate_ids(model.session, encoded, config, model.eos_ids, model.pad_id)
    for ids, tokens in zip(encoded, new):
        click.echo(tokenizer.decode(tokens) if as_chat else tokenizer.decode(ids + tokens))


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System message.")
@sampling_options
def chat(model_dir, system, max_new_tokens, provider, sample, temperature, top_k, top_p, seed):
    """Interactive chat: one line per user turn, the KV cache kept across turns (Ctrl-D or /exit to quit)."""
    from lowbit.runtime.chat import Chat
    from lowbit.runtime.model import Model

    model = Model.load(model_dir, provider)
    conversation = Chat(model, system, **_sampling(sample, temperature, top_k, top_p, seed))
    model.tokenizer.check_chat_template()
    while True:
        try:
            line = input("> ")
        except EOFError:
            click.echo()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        for piece in conversation.send(line, max_new_tokens):
            click.echo(piece, nl=False)
        click.echo()


@main.command(name="eval")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Plain text file.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Window length [default: min(2048, context)].")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Window step [default: seq-len].")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Only score the first N tokens of the file.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Float folder (e.g. the q0f32 conversion): also report KL divergence and top-1 agreement to it.")
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "tensorrt"]))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def evaluate(model_dir, data, seq_len, stride, max_tokens, reference, provider, as_json):
    """Perplexity of a converted model over a text file (sliding window); KL to a reference model."""
    from tqdm import tqdm

    from lowbit.runtime.evaluate import read_text_file
    from lowbit.runtime.model import Model

    text = read_text_file(data)  # a missing, empty or non-UTF-8 file is an error before the model loads
    model = Model.load(model_dir, provider)
    ref = Model.load(reference, provider) if reference is not None else None
    result = model.perplexity(text, seq_len=seq_len, stride=stride, max_tokens=max_tokens, reference=ref,
                              progress=lambda it: tqdm(it, desc="eval", leave=False, disable=None))
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.as_dict().items() if k != "nll_sum"}))
        return
    click.echo(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} windows)")
    if ref is not None:
        click.echo(f"KL divergence to {reference}: mean {result.kl:.5f} nats/token, 99th percentile "
                   f"{result.kl_p99:.5f}; top-1 agreement {result.top1:.4f}")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@speed_options
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "tensorrt"]))
@click.option("--prompt-session/--no-prompt-session", default=True, show_default=True,
              help="Run prompts of 32+ tokens on a second session whose MatMulNBits compute in float32 (CPU, "
                   "symmetric 4-bit grouped folders on ORT's int8 kernels, without VNNI; "
                   "docs/targets.md#prompts-float32-matmulnbits).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Rows per step (random prompts of the same length); tokens per second count every row.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def bench(model_dir, prompt_len, new_tokens, repeats, threads, provider, prompt_session, batch, as_json):
    """Prefill/decode tokens per second, peak RSS and model bytes."""
    from lowbit.runtime.bench import benchmark
    from lowbit.runtime.session import create_session

    session = create_session(model_dir, provider, threads, prompt_session=prompt_session)
    result = benchmark(session, prompt_len, new_tokens, repeats, batch)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        click.echo(
            f"prefill {result.prefill_tokens_per_s:.1f} tok/s ({prompt_len} tokens"
            f"{f' x {batch} rows' if batch > 1 else ''}), "
            f"decode {result.decode_tokens_per_s:.1f} tok/s, peak RSS {result.peak_rss_mb:.0f} MB, "
            f"model {result.model_bytes / 1e6:.1f} MB"
        )


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def inspect(model_dir, as_json):
    """Ops, weight sizes and scheme of a converted folder."""
    from lowbit.runtime.inspect import inspect_model

    info = inspect_model(model_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{model_dir}: scheme {info['scheme']}, target {info['target']}, model_type {info['model_type']}")
    click.echo(f"weights: {info['weight_bytes'] / 1e6:.2f} MB in {info['initializers']} initializers")
    if info["quantized"]:
        saving = ""
        if info.get("float_weight_bytes"):
            saving = f" (float: {info['float_weight_bytes'] / 1e6:.2f} MB, {info['float_weight_bytes'] / max(info['weight_bytes'], 1):.2f}x smaller)"
        click.echo(f"quantized nodes: {len(info['quantized'])}{saving}")
        for name, q in info["quantized"].items():
            size = f"{q['bytes'] / 1e3:.1f} kB (float {q['float_bytes'] / 1e3:.1f} kB)" if "bytes" in q else ""
            compute = f"{q['compute']} compute" if "compute" in q else ""
            activation = f"; activations {q['activation']}" if "activation" in q else ""
            imported = f"; imported from {q['import']}" if "import" in q else ""
            recipe = f"; recipe {q['recipe']}" if "recipe" in q else ""
            click.echo(f"  {name:32s} {q['op']:36s} {q['quant']:26s} {q['format']:24s} {compute:14s} {size}"
                       + activation + imported + recipe)
    click.echo("ops: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    layers = {k: v for k, v in info["nodes_per_layer"].items() if k != "other"}
    if layers:
        spread = (f"{min(layers.values())}" if min(layers.values()) == max(layers.values())
                  else f"{min(layers.values())}-{max(layers.values())}")
        click.echo(f"nodes: {info['nodes']}; {spread} per decoder layer ({len(layers)} layers), "
                   f"{info['nodes_per_layer'].get('other', 0)} outside them")


@main.command()
@click.argument("model_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Plain text file.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Folder (e.g. the q0f32 one) to measure KL and top-1 agreement against.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="HTML file to write.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the numbers here.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Window length [default: min(2048, context)].")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Window step [default: seq-len].")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None,
              help="Only score the first N tokens of the file.")
@speed_options
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "tensorrt"]))
def report(model_dirs, data, reference, output, json_path, seq_len, stride, max_tokens, prompt_len, new_tokens,
           repeats, threads, provider):
    """Size, perplexity, KL to a reference and speed of converted folders: one HTML page with plots and a table."""
    import shlex

    from tqdm import tqdm

    from lowbit.runtime.evaluate import read_text_file
    from lowbit.runtime.report import check_output, measure, require_matplotlib, write_report

    require_matplotlib()
    for path in (output, json_path):  # refuse before measuring for minutes
        if path is not None:
            check_output(path)
    text = read_text_file(data)
    ctx = click.get_current_context()
    words = ["lowbit", "report"]
    for param in ctx.command.params:  # the command as given, for the record on the page
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words += map(str, value)
        elif value not in (None, False, param.default):
            words += [param.opts[0]] + ([] if value is True else [str(value)])

    def on_result(r):
        kl = f", KL {r.kl:.5f}, top-1 {r.top1:.4f}" if r.kl is not None else ""
        name = r.label if r.label == r.scheme else f"{r.label} ({r.scheme})"
        click.echo(f"{name}: {r.model_bytes / 1e6:.2f} MB, perplexity {r.perplexity:.4f}{kl}, "
                   f"prefill {r.prefill_tokens_per_s:.1f} tok/s, decode {r.decode_tokens_per_s:.1f} tok/s")

    result = measure(model_dirs, text, reference, data=str(data), seq_len=seq_len, stride=stride,
                     max_tokens=max_tokens, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
                     provider=provider, threads=threads, command=shlex.join(words), on_result=on_result,
                     progress=lambda it, label: tqdm(it, desc=label, leave=False, disable=None))
    write_report(result, output, json_path)
    click.echo(f"wrote {output}" + (f" and {json_path}" if json_path else ""))


if __name__ == "__main__":
    main()
