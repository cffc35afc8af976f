"""Caption stage benchmarks: data-path efficiency, batching, streaming memory, GPU throughput.

CPU, with the tiny demo LLaVA-1.5 (one run, side by side)::

    python benchmarks/caption.py

1. efficiency: the stage's images/s over a model-only loop (same model, same batch size, same
   fixed number of new tokens, inputs already decoded and preprocessed in memory). The data
   path (tar streaming, decoding in DataLoader workers, parquet) must not be the bottleneck:
   goal >= 0.85.
2. batching: the stage's images/s at batch 32 over batch 1.
3. memory: peak RSS of the stage's main process over 2 shards and over 20 shards (a fresh
   process each); streaming means the two are about equal.

The ``openai`` backend on CPU, through a real ``transformers serve`` of the same tiny model
(the ``serve`` extra), against the in-process backend on the same shard, at several
``caption.concurrency`` values::

    python benchmarks/caption.py --backend openai --concurrency 1,8,32

4. serving: the openai backend's images/s over the in-process backend's (same model, shard and
   token budget), and how it scales with the number of requests in flight.

GPU (CUDA), the real LLaVA-1.5-7B architecture from its published config, random weights,
bf16, a fixed 64 new tokens per image, images/s at several batch sizes::

    python benchmarks/caption.py --gpu --batch-sizes 1,8,16,32,64

and the same architecture saved as a checkpoint (an offline tokenizer and processor of
LLaVA-1.5's layout: 32064 tokens, ``<image>`` = 32000, 336 px) and served by
``transformers serve`` on the same GPU, captioned by the stage's openai backend::

    python benchmarks/caption.py --gpu-serve --concurrency 1,8 --serve-images 32

``--serve-arch small --serve-device cpu`` runs that path on a CPU with a small model of the
same layout (a check that it works before it meets a GPU). ``--json FILE`` appends every figure
as a JSON line (``benchmarks/gpu.sh`` reads them into one table).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# -- inputs ----------------------------------------------------------------------------------
def write_shards(images_dir: Path, n_shards: int, per_shard: int, image_size: int) -> None:
    """Shards in img2dataset's layout: JPEG photos-like noise + shapes, txt, json, stats.

    Written with the standard library's ``tarfile`` (no webdataset needed on a GPU node).
    """
    import tarfile

    import numpy as np
    from PIL import Image, ImageDraw

    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for shard in range(n_shards):
        name = f"{shard:05d}"
        with tarfile.open(images_dir / f"{name}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{name}{i:04d}"
                w = image_size
                h = int(image_size * rng.uniform(0.6, 1.0))
                noise = np.random.default_rng(shard * 10_000 + i).integers(0, 255, (h, w, 3))
                image = Image.fromarray(noise.astype("uint8"))
                draw = ImageDraw.Draw(image)
                draw.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(200, 40, 40))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                meta = {"key": key, "status": "success", "caption": f"picture {i}"}
                add(tar, f"{key}.jpg", buffer.getvalue())
                add(tar, f"{key}.txt", meta["caption"].encode())
                add(tar, f"{key}.json", json.dumps(meta).encode())
        stats = {"count": per_shard, "successes": per_shard}
        (images_dir / f"{name}_stats.json").write_text(json.dumps(stats))


def write_config(run_dir: Path, models_dir: Path, **caption: Any) -> Path:
    import yaml

    section = {"model": "demo:tiny-llava-1.5", "dtype": "float32", "device": "cpu", **caption}
    data = {"run_dir": str(run_dir), "demo": {"models_dir": str(models_dir)}, "caption": section}
    path = run_dir / "config.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def caption_settings(args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    return {
        "batch_size": batch_size,
        "num_workers": args.workers,
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,  # every image costs the same generation
    }


# -- measurements ----------------------------------------------------------------------------
def stage_images_per_s(config_path: Path) -> tuple[float, int, float]:
    """Run the stage over every shard of the config's run.

    Returns images/s over the shard loop, the number of images, and the share of the shard
    time the model waited for decoded images (from the shards' stats).
    """
    import shutil

    from recaption.config import load_config
    from recaption.stages import StageContext, run

    config = load_config(config_path)
    shutil.rmtree(config.captions_dir, ignore_errors=True)
    summary = run("caption", StageContext(config))
    assert summary.ok, summary.describe()
    n = summary.samples_ok + summary.samples_failed
    stats = [json.loads(p.read_text()) for p in config.captions_dir.glob("*_stats.json")]
    waiting = sum(s["seconds_waiting_for_images"] for s in stats) / sum(s["seconds"] for s in stats)
    return n / summary.seconds, n, waiting


def model_only_images_per_s(config_path: Path) -> tuple[float, int]:
    """Generate over the same batches with inputs decoded and preprocessed beforehand."""
    from recaption.config import load_config
    from recaption.demo.models import resolve_model
    from recaption.ledger import list_shards
    from recaption.models.llava import load_captioner
    from recaption.shards import iter_tar_samples
    from recaption.signals import StopSignals
    from recaption.stages.caption import ShardBatches, ShardCaptioner

    config = load_config(config_path)
    section = config.caption
    captioner = load_captioner(
        resolve_model(config, section.model), dtype=section.dtype, device=section.device or "cpu"
    )
    worker = ShardCaptioner(config, captioner, Path(tempfile.mkdtemp()), StopSignals())
    batches = []
    for shard in list_shards(config.images_dir, "_stats.json"):
        tar = config.images_dir / f"{shard}.tar"
        dataset = ShardBatches(tar, captioner.processor, worker.template, section)
        samples = list(iter_tar_samples(tar))
        size = section.batch_size
        for start in range(0, len(samples), size):
            batches.append(dataset.prepare(len(batches), samples[start : start + size]))
    n = sum(len(b.good) for b in batches)
    worker.generate(batches[0].inputs, 0)  # warm-up, as the stage's first shard pays it too
    t0 = time.perf_counter()
    for batch in batches:
        worker.generate(batch.inputs, batch.index)
    return n / (time.perf_counter() - t0), n


def peak_rss_mib(config_path: Path) -> float:
    """Peak RSS (VmHWM) of a fresh process that runs the stage over the config's shards."""
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(config_path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return float(out.stdout.strip().splitlines()[-1])


def rss_child(config_path: str) -> None:
    logging.disable(logging.INFO)
    stage_images_per_s(Path(config_path))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            sys.stdout.write(f"{int(line.split()[1]) / 1024:.1f}\n")


def cpu_benchmarks(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="caption-bench-"))
    models = root / "models"
    main_run = root / "efficiency"
    write_shards(main_run / "images", args.shards, args.per_shard, args.image_size)

    rows: list[tuple[str, str, str, str]] = []
    cfg = write_config(main_run, models, **caption_settings(args, args.batch_size))
    # Interleaved repeats, best of each: the machine may be shared, and noise only slows runs.
    stage_ips, model_ips, waiting = 0.0, 0.0, 1.0
    for _ in range(args.repeats):
        ips, n, wait = stage_images_per_s(cfg)
        stage_ips, waiting = max(stage_ips, ips), min(waiting, wait)
        model_ips = max(model_ips, model_only_images_per_s(cfg)[0])
    rows.append(
        (
            f"1. efficiency (batch {args.batch_size}, {n} images, {args.new_tokens} new tokens)",
            f"stage {stage_ips:.1f} img/s",
            f"model-only {model_ips:.1f} img/s",
            f"ratio {stage_ips / model_ips:.2f} (goal >= 0.85); "
            f"model idle for images {100 * waiting:.1f}% of the stage time",
        )
    )

    batching_run = root / "batching"
    write_shards(batching_run / "images", 1, args.batching_images, args.image_size)
    per_batch = {}
    for batch_size in (1, 32):
        cfg = write_config(batching_run, models, **caption_settings(args, batch_size))
        per_batch[batch_size] = max(stage_images_per_s(cfg)[0] for _ in range(args.repeats))
    rows.append(
        (
            f"2. batching (stage, {args.batching_images} images)",
            f"batch 32 {per_batch[32]:.1f} img/s",
            f"batch 1 {per_batch[1]:.1f} img/s",
            f"ratio {per_batch[32] / per_batch[1]:.2f}",
        )
    )

    rss = {}
    for n_shards in (2, 20):
        run_dir = root / f"memory{n_shards}"
        write_shards(run_dir / "images", n_shards, args.memory_per_shard, args.image_size)
        settings = {**caption_settings(args, args.batch_size), "max_new_tokens": 8}
        settings["min_new_tokens"] = 8  # memory does not depend on caption length
        rss[n_shards] = peak_rss_mib(write_config(run_dir, models, **settings))
    rows.append(
        (
            f"3. memory ({args.memory_per_shard} images/shard)",
            f"20 shards {rss[20]:.0f} MiB",
            f"2 shards {rss[2]:.0f} MiB",
            f"ratio {rss[20] / rss[2]:.2f} (streaming: ~1.0)",
        )
    )
    width = max(len(r[0]) for r in rows)
    sys.stdout.write(
        f"\ncaption benchmarks (CPU, tiny LLaVA-1.5, torch threads "
        f"{torch.get_num_threads()}, DataLoader workers {args.workers})\n"
    )
    for r in rows:
        sys.stdout.write(f"{r[0]:<{width}}  {r[1]:>24}  {r[2]:>26}  {r[3]}\n")


# -- the openai backend: in-process vs transformers serve -----------------------------------------
TRANSFORMERS_SERVE = "transformers serve --host {host} --port {port} {model}"


def record(args: argparse.Namespace, **fields: Any) -> None:
    """Append one figure to ``--json`` (one JSON object a line), if asked."""
    if getattr(args, "json", None):
        with Path(args.json).open("a") as f:
            f.write(json.dumps(fields) + "\n")


def shard_rate(config_path: Path) -> tuple[float, float, float]:
    """Run the stage over the config's shards; images/s and new tokens/s inside the shards
    (model loading and server start-up excluded), and the mean new tokens per captioned image."""
    import shutil

    from recaption.config import load_config
    from recaption.stages import StageContext, run

    config = load_config(config_path)
    shutil.rmtree(config.captions_dir, ignore_errors=True)
    summary = run("caption", StageContext(config))
    assert summary.ok, summary.describe()
    stats = [json.loads(p.read_text()) for p in config.captions_dir.glob("*_stats.json")]
    seconds = sum(s["seconds"] for s in stats)
    images = sum(s["n_input"] for s in stats)
    tokens = sum(s["n_new_tokens"] for s in stats)
    ok = sum(s["n_ok"] for s in stats)
    return images / seconds, tokens / seconds, tokens / max(ok, 1)


def start_server(command: str, model: str, workdir: Path, timeout: float) -> Any:
    """Start ``command`` for ``model`` through the stage's own :class:`ManagedServer`."""
    from recaption.serving import ManagedServer

    server = ManagedServer(
        command,
        host="127.0.0.1",
        port=None,
        model=model,
        log_path=workdir / "server.log",
        state_path=workdir / "server.json",
        startup_timeout=timeout,
        stop_timeout=60,
    )
    server.start()
    return server


def cpu_serve_benchmark(args: argparse.Namespace) -> None:
    """4. The openai backend through ``transformers serve`` vs the in-process backend (CPU)."""
    from recaption.config import load_config
    from recaption.demo.models import resolve_model

    threads = args.threads or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the server gets the threads we get
    import torch

    torch.set_num_threads(threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="caption-serve-bench-"))
    models, run_dir = root / "models", root / "serve"
    write_shards(run_dir / "images", 1, args.serve_images, args.image_size)
    settings = {
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "max_new_tokens": args.new_tokens,
    }
    # transformers serve refuses min_tokens, so neither side forces the length: the tiny
    # random model runs to the budget almost always; the table shows the mean it generated.
    local_cfg = write_config(run_dir, models, **settings)
    local = max((shard_rate(local_cfg) for _ in range(args.repeats)), key=lambda r: r[0])
    # One image per generate() call, as the server runs them: the batching's share of the gap.
    single_cfg = write_config(run_dir, models, **{**settings, "batch_size": 1})
    single = max((shard_rate(single_cfg) for _ in range(args.repeats)), key=lambda r: r[0])
    model = resolve_model(load_config(local_cfg), "demo:tiny-llava-1.5")
    server = start_server(TRANSFORMERS_SERVE, model, root, 600)
    results = {}
    try:
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            cfg = write_config(
                run_dir,
                models,
                backend="openai",
                endpoint=server.endpoint,
                concurrency=concurrency,
                **settings,
            )
            runs = [shard_rate(cfg) for _ in range(args.repeats)]
            results[concurrency] = max(runs, key=lambda r: r[0])
    finally:
        server.stop()
    title = (
        f"\n4. serving (CPU, tiny LLaVA-1.5, {args.serve_images} images of {args.image_size} px, "
        f"max {args.new_tokens} new tokens, torch threads {threads} in each process, "
        f"best of {args.repeats})\n"
    )
    sys.stdout.write(title)
    sys.stdout.write(
        f"{'backend':<34} {'img/s':>7} {'new tok/s':>10} {'tok/img':>8} {'vs in-process':>14} "
        f"{'vs c=1':>7}\n"
    )
    sys.stdout.write(
        f"{'in-process (batch ' + str(args.batch_size) + ')':<34} {local[0]:>7.2f} "
        f"{local[1]:>10.0f} {local[2]:>8.1f} {1.0:>14.2f} {'':>7}\n"
    )
    sys.stdout.write(
        f"{'in-process (batch 1)':<34} {single[0]:>7.2f} {single[1]:>10.0f} {single[2]:>8.1f} "
        f"{single[0] / local[0]:>14.2f} {'':>7}\n"
    )
    record(
        args,
        measure="caption in-process (stage)",
        setting=f"batch {args.batch_size}",
        images_per_s=local[0],
        new_tokens_per_s=local[1],
        device="cpu",
    )
    first = next(iter(results.values()))[0]
    for concurrency, (ips, tps, per_image) in results.items():
        sys.stdout.write(
            f"{'openai -> transformers serve, c=' + str(concurrency):<34} {ips:>7.2f} "
            f"{tps:>10.0f} {per_image:>8.1f} {ips / local[0]:>14.2f} {ips / first:>7.2f}\n"
        )
        record(
            args,
            measure="caption via transformers serve (stage)",
            setting=f"concurrency {concurrency}",
            images_per_s=ips,
            new_tokens_per_s=tps,
            ratio_to_in_process=ips / local[0],
            device="cpu",
        )


# -- a LLaVA-1.5 checkpoint with random weights, made offline -------------------------------------
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llava_15_processor(image_size: int = 336, patch_size: int = 14) -> Any:
    """A ``LlavaProcessor`` with llava-1.5-7b-hf's layout, built without the hub.

    A word-level tokenizer over LLaVA-1.5's 32064 ids (``<unk> <s> </s>`` at 0-2, ``<image>``
    at 32000, ``<pad>`` at 32001), so whatever random weights generate decodes; CLIP's image
    processor at 336 px; the llava-hf chat template. The text of a prompt tokenizes to
    ``<unk>``s, which is as long as a real prompt within a few tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    try:  # transformers >= 5 names the PIL backend explicitly
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, 32000):
        vocab[f"w{i}"] = i
    vocab.update({"<image>": 32000, "<pad>": 32001})
    for i in range(32002, 32064):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        padding_side="left",
        model_max_length=4096,
        chat_template=LLAVA_15_TEMPLATE,
    )
    image_processor = ImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_15_TEMPLATE,
    )


def small_llava_config() -> Any:
    """LLaVA-1.5-7B's layout (vocabulary, 336 px, 14 px patches, 576 image tokens), small."""
    config = llava_15_7b_config()
    for part, sizes in (
        (config.vision_config, {"hidden_size": 64, "intermediate_size": 128}),
        (config.text_config, {"hidden_size": 128, "intermediate_size": 256}),
    ):
        for name, value in sizes.items():
            setattr(part, name, value)
        part.num_hidden_layers = 2
        part.num_attention_heads = 4
    config.text_config.num_key_value_heads = 4
    config.vision_config.projection_dim = 64
    return config


def save_random_llava(folder: Path, arch: str, device: str, dtype: Any) -> Path:
    """Save a LLaVA-1.5 of ``arch`` (``llava-1.5-7b`` or ``small``) with random weights and its
    offline processor into ``folder`` (reused when it is there already)."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    done = folder / "recaption_random.json"
    if done.exists() and json.loads(done.read_text()).get("arch") == arch:
        return folder
    config = llava_15_7b_config() if arch == "llava-1.5-7b" else small_llava_config()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=32001)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    llava_15_processor().save_pretrained(folder)
    done.write_text(json.dumps({"arch": arch, "note": "random weights"}))
    sys.stdout.write(
        f"saved {arch} (random weights, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
        f"parameters) to {folder} in {time.perf_counter() - t0:.0f}s\n"
    )
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


def serve_benchmark(args: argparse.Namespace) -> None:
    """LLaVA-1.5 through ``transformers serve``: the stage's openai backend on one device."""
    import torch

    device = args.serve_device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    root = Path(args.workdir or tempfile.mkdtemp(prefix="caption-gpu-serve-"))
    folder = save_random_llava(root / f"random-{args.serve_arch}", args.serve_arch, device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    command = f"{TRANSFORMERS_SERVE} --device {device} --dtype {dtype_name}"
    models = root / "models"
    settings = {
        "model": str(folder),
        "batch_size": 8,
        "num_workers": args.workers,
        "max_new_tokens": args.gpu_new_tokens,
        "request_image_side": 336,
    }
    warm, run_dir = root / "warmup", root / "serve"
    write_shards(warm / "images", 1, 4, 512)
    write_shards(run_dir / "images", 1, args.serve_images, 512)
    t0 = time.perf_counter()
    server = start_server(command, str(folder), root, args.serve_startup_timeout)
    sys.stdout.write(
        f"transformers serve on {device} answered after {time.perf_counter() - t0:.0f}s\n"
    )
    try:
        shard_rate(
            write_config(
                warm, models, backend="openai", endpoint=server.endpoint, concurrency=4, **settings
            )
        )
        sys.stdout.write(f"{'concurrency':>11}  {'img/s':>7}  {'new tok/s':>10}  {'tok/img':>7}\n")
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            cfg = write_config(
                run_dir,
                models,
                backend="openai",
                endpoint=server.endpoint,
                concurrency=concurrency,
                **settings,
            )
            ips, tps, per_image = shard_rate(cfg)
            sys.stdout.write(f"{concurrency:>11}  {ips:>7.2f}  {tps:>10.0f}  {per_image:>7.1f}\n")
            record(
                args,
                measure=f"{args.serve_arch} via transformers serve (stage)",
                setting=f"concurrency {concurrency}",
                images_per_s=ips,
                new_tokens_per_s=tps,
                new_tokens_per_image=per_image,
                device=device,
            )
    finally:
        server.stop()


# -- GPU: the real LLaVA-1.5-7B architecture ---------------------------------------------------
def llava_15_7b_config() -> Any:
    """llava-hf/llava-1.5-7b-hf's config.json, written out (no hub access needed)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(  # CLIP ViT-L/14 at 336 px
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(  # Vicuna-7B v1.5 (Llama 2 7B)
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32001,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        image_seq_length=576,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def gpu_benchmark(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device; none is visible here")
    from recaption.distributed import default_device

    device = default_device()
    config = llava_15_7b_config()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):  # initialised on the GPU, directly in bf16
        model = LlavaForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).eval()
    n_params = sum(p.numel() for p in model.parameters()) / 1e9
    sys.stdout.write(
        f"LLaVA-1.5-7B architecture, random weights, bf16, {n_params:.2f}B parameters, "
        f"{torch.cuda.get_device_name(device)}, built in {time.perf_counter() - t0:.0f}s\n"
    )
    # "USER: <image>\n<dense prompt> ASSISTANT:" is about 20 text tokens around 576 image ones.
    text_ids = [1, 3148, 1001, 29901] + [32000] * 576 + [13] + list(range(500, 516)) + [319, 29901]
    new_tokens = args.gpu_new_tokens
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        input_ids = torch.tensor([text_ids] * batch_size, device=device)
        pixel_values = torch.randn(batch_size, 3, 336, 336, device=device, dtype=torch.bfloat16)
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "do_sample": False,
            "pad_token_id": 32001,
        }
        try:
            with torch.inference_mode():
                model.generate(**{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                for _ in range(args.gpu_repeats):
                    model.generate(**kwargs)
                torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            sys.stdout.write(f"batch {batch_size}: out of memory\n")
            record(
                args,
                measure="llava-1.5-7b in-process (generate)",
                setting=f"batch {batch_size}",
                note="out of memory",
            )
            torch.cuda.empty_cache()
            break
        seconds = (time.perf_counter() - t0) / args.gpu_repeats
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        results.append((batch_size, batch_size / seconds, batch_size * new_tokens / seconds, peak))
        record(
            args,
            measure="llava-1.5-7b in-process (generate)",
            setting=f"batch {batch_size}",
            images_per_s=batch_size / seconds,
            new_tokens_per_s=batch_size * new_tokens / seconds,
            peak_gib=peak,
            device=torch.cuda.get_device_name(device),
        )
    base = results[0][1] if results else 1.0
    header = f"{'batch':>5}  {'img/s/GPU':>10}  {'new tok/s':>10}  {'vs b1':>6}  peak GiB\n"
    sys.stdout.write(header)
    for batch_size, ips, tps, peak in results:
        line = f"{batch_size:>5}  {ips:>10.2f}  {tps:>10.0f}  {ips / base:>6.2f}  {peak:.1f}\n"
        sys.stdout.write(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=2, help="shards for 1.")
    parser.add_argument("--per-shard", type=int, default=128, help="images per shard for 1.")
    parser.add_argument("--memory-per-shard", type=int, default=32, help="images/shard for 3.")
    parser.add_argument("--image-size", type=int, default=256, help="JPEG width in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64, help="fixed new tokens per image")
    parser.add_argument("--batching-images", type=int, default=64, help="images for 2.")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure, best kept")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader decode workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, 0: torch default")
    parser.add_argument("--workdir", help="keep inputs and outputs here (default: a temp dir)")
    parser.add_argument("--gpu", action="store_true", help="run the LLaVA-1.5-7B GPU benchmark")
    parser.add_argument("--batch-sizes", default="1,8,16,32,64", help="GPU batch sizes")
    parser.add_argument("--gpu-new-tokens", type=int, default=64)
    parser.add_argument("--gpu-repeats", type=int, default=2)
    parser.add_argument(
        "--backend",
        choices=["transformers", "openai"],
        default="transformers",
        help="openai: benchmark 4 (the openai backend through transformers serve) on CPU",
    )
    parser.add_argument("--concurrency", default="1,8,32", help="requests in flight to try")
    parser.add_argument("--serve-images", type=int, default=48, help="images for 4 / --gpu-serve")
    parser.add_argument(
        "--gpu-serve", action="store_true", help="LLaVA-1.5 via transformers serve on the GPU"
    )
    parser.add_argument("--serve-arch", choices=["llava-1.5-7b", "small"], default="llava-1.5-7b")
    parser.add_argument("--serve-device", help="device for --gpu-serve (default: cuda if any)")
    parser.add_argument("--serve-startup-timeout", type=float, default=600)
    parser.add_argument("--json", help="append every figure to this file as JSON lines")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.rss_child:
        rss_child(args.rss_child)
    elif args.gpu:
        gpu_benchmark(args)
    elif args.gpu_serve:
        serve_benchmark(args)
    elif args.backend == "openai":
        cpu_serve_benchmark(args)
    else:
        cpu_benchmarks(args)


if __name__ == "__main__":
    main()
