"""`onnxformer train`: the command-line face of `onnxformer.modeling.train.train`.

Importing this module never imports torch (the CLI's --help stays fast and the runtime
subcommands stay torch-free); `run` imports the trainer. Options left unset take the
TrainConfig defaults, which for steps, batch size, learning rate, warmup and evaluation
interval depend on the task (TASK_DEFAULTS in onnxformer.modeling.train).

Examples::

    onnxformer train --arch encoder --task classify --data builtin:sentiment --out runs/sentiment
    onnxformer train --arch encoder-decoder --task seq2seq --data builtin:numbers --out runs/numbers
    onnxformer train --arch encoder --task mlm --nsp --data builtin:corpus --out runs/bert
    onnxformer train --arch encoder --task classify --data builtin:sentiment \\
        --from-checkpoint runs/bert --lora-rank 8 --out runs/sentiment-lora
    onnxformer train --arch decoder --task sft --data pairs.jsonl \
        --from-checkpoint path/to/hf-llama-folder --lora-rank 8 --out runs/llama-sft   # a local Hugging Face folder
    torchrun --nproc_per_node 2 -m onnxformer.runtime.cli train ...   # DistributedDataParallel
"""

from __future__ import annotations

import argparse

# Kept in sync with onnxformer.modeling.train (a test checks it); listed here so that
# --help works without importing torch.
ARCHS = ("encoder", "decoder", "encoder-decoder", "prefix-lm")
TASKS = ("causal-lm", "mlm", "denoise", "seq2seq", "sft", "prefix-lm", "classify", "distill")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")

# CLI option dest -> TrainConfig field, where the names differ.
_FIELD_OF = {"out": "out_dir", "valid": "valid_data", "no_progress": "progress"}


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in LORA_TARGETS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown LoRA target(s) {', '.join(bad) or '(none given)'}; choose from {','.join(LORA_TARGETS)}"
        )
    return names


def _count_or_all(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples or 'all'; got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "task -> arch and data:\n"
        "  causal-lm  decoder|prefix-lm   text      mlm       encoder          text (+ --nsp)\n"
        "  denoise    encoder-decoder     text      seq2seq   encoder-decoder  source/target\n"
        "  sft        decoder|prefix-lm   source/target (prompt -> continuation), or messages\n"
        "                                 (chat: the assistant turns, in the model's chat template)\n"
        "  prefix-lm  prefix-lm           source/target, or text split at random points\n"
        "  classify   encoder             text/label\n"
        "  distill    decoder|prefix-lm|encoder-decoder, as causal-lm / sft / seq2seq, --teacher PATH\n"
        "Unset steps, batch size, lr, warmup and eval interval take the task's defaults\n"
        "(tuned for the tiny preset on the built-in data; see benchmarks/TRAINING.md).\n"
        "Under torchrun the same command trains with DistributedDataParallel; rank 0 writes."
    )
    need = parser.add_argument_group("what to train")
    need.add_argument("--arch", required=True, choices=ARCHS, help="model architecture")
    need.add_argument("--task", required=True, choices=TASKS, help="training objective (see below)")
    need.add_argument("--data", required=True, metavar="SPEC",
                      help="builtin:corpus|sentiment|numbers|chat, shared:NAME (sst2, banking77, multi30k, tico19, "
                           "tinyshakespeare), or a file: .csv/.tsv (with a header), .jsonl, .json (an array of "
                           "objects), .parquet, .txt (plain text); the fields are detected (see below)")
    need.add_argument("--valid", metavar="PATH", help="validation file (default: hold out 5%% of a training file)")
    need.add_argument("--out", required=True, metavar="DIR", help="run directory: checkpoints, latest, metrics.jsonl")

    fields = parser.add_argument_group(
        "data fields", "which field of a data file is what; unset: detected from text/label, sentence/label, "
        "source/target, prompt/completion, instruction(+input)/output, question/answer, messages. The mapping "
        "and the data kind are printed at the start.")
    fields.add_argument("--text-field", metavar="NAME", help="the text (classification, language modelling)")
    fields.add_argument("--label-field", metavar="NAME", help="the class label (strings or integers)")
    fields.add_argument("--source-field", metavar="NAME[,NAME]",
                        help="the source or prompt; several fields are joined by a blank line (instruction,input)")
    fields.add_argument("--target-field", metavar="NAME", help="the target or completion")
    fields.add_argument("--messages-field", metavar="NAME", help="a conversation: a list of {role, content} turns")
    fields.add_argument("--text-layout", choices=("lines", "blank-line-documents"),
                        help=".txt files: one document per line, or documents separated by blank lines "
                             "(default: blank-line-documents if the file has blank lines, else lines)")

    model = parser.add_argument_group("model and tokenizer")
    model.add_argument("--preset", choices=("tiny", "small", "base"), help="model size (default tiny)")
    model.add_argument("--vocab-size", type=int, metavar="N", help="tokenizer vocabulary upper bound (default 1024)")
    model.add_argument("--max-len", type=int, metavar="N",
                       help="longest token row: longer documents are split into windows (causal-lm, mlm, denoise, "
                            "prefix-lm text), other examples cut, and either is counted in the log; a new model's "
                            "context grows to N (default 128, or a loaded model's max_seq_len if shorter)")
    model.add_argument("--dropout", type=float, metavar="P", help="dropout while training (default 0)")
    model.add_argument("--nsp", action="store_true", default=None, help="mlm: add next-sentence prediction")
    model.add_argument("--from-checkpoint", metavar="PATH",
                       help="fine-tune: start from this run dir, checkpoint or local Hugging Face model folder "
                            "(config.json, safetensors, tokenizer.json; weights + tokenizer); classify adds a fresh head")
    model.add_argument("--teacher", metavar="PATH",
                       help="task distill: the teacher (run dir, checkpoint or local Hugging Face folder); the "
                            "student gets its tokenizer and learns its token distributions")
    model.add_argument("--distill-temperature", type=float, metavar="T",
                       help="task distill: softmax temperature of the KL term (default 2)")
    model.add_argument("--distill-kl-weight", type=float, metavar="W",
                       help="task distill: weight of the KL term; the hard-label loss gets 1 - W (default 0.5)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, metavar="N", help="optimizer steps (default: per task)")
    opt.add_argument("--batch-size", type=int, metavar="N", help="examples per process per micro-step (default: per task)")
    opt.add_argument("--grad-accum", type=int, metavar="N", help="micro-steps per optimizer step (default 1)")
    opt.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (default: per task)")
    opt.add_argument("--min-lr-ratio", type=float, metavar="R", help="cosine floor as a fraction of lr (default 0.1)")
    opt.add_argument("--warmup", type=int, metavar="N", help="linear warmup steps (default: per task)")
    opt.add_argument("--weight-decay", type=float, metavar="W", help="AdamW weight decay on matrices (default 0.01)")
    opt.add_argument("--grad-clip", type=float, metavar="NORM", help="clip the global gradient norm; 0 = off (default 1.0)")
    opt.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast (CPU or CUDA)")
    opt.add_argument("--seed", type=int, metavar="N", help="seed of init, data order and noise (default 0)")
    opt.add_argument("--data-seed", type=int, metavar="N", help="seed of built-in data and hold-out split (default 0)")
    opt.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (default auto)")
    opt.add_argument("--threads", type=int, metavar="N",
                     help="CPU threads for torch ops; 0 = torch's default, one per core (default 1: "
                          "tiny models are fastest single-threaded)")

    peft = parser.add_argument_group("parameter-efficient fine-tuning")
    peft.add_argument("--lora-rank", type=int, metavar="R", help="LoRA rank; > 0 turns LoRA on (default 0)")
    peft.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA scale numerator, update * A/R (default 16)")
    peft.add_argument("--lora-dropout", type=float, metavar="P", help="dropout on the LoRA input (default 0)")
    peft.add_argument("--lora-targets", type=_targets, metavar="NAMES",
                      help=f"comma-separated projections to adapt, from {','.join(LORA_TARGETS)} "
                           "(default q_proj,k_proj,v_proj,o_proj)")
    peft.add_argument("--bitfit", action="store_true", default=None, help="train only biases (and the task head)")

    run = parser.add_argument_group("evaluation, checkpoints, logging")
    run.add_argument("--eval-every", type=int, metavar="N", help="steps between validation runs (default: per task)")
    run.add_argument("--eval-examples", type=int, metavar="N", help="validation examples per periodic run (default 500)")
    run.add_argument("--final-eval-examples", type=_count_or_all, metavar="N|all",
                     help="examples per split of the final evaluation (default: --eval-examples)")
    run.add_argument("--save-every", type=int, metavar="N", help="steps between checkpoints; 0 = at the end only (default 0)")
    run.add_argument("--keep-checkpoints", type=int, metavar="N", help="newest checkpoints to keep; 0 = all (default 2)")
    run.add_argument("--log-every", type=int, metavar="N", help="steps between loss lines in metrics.jsonl (default 10)")
    run.add_argument("--resume", action="store_true", default=None, help="continue the run in --out from its latest checkpoint (with the same data, model and batch "
                          "settings; --lr, --steps, the schedule, evaluation and checkpoint options may change)")
    run.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")


def config_from_args(args: argparse.Namespace):
    """A TrainConfig from parsed options; unset options keep TrainConfig's defaults."""
    import dataclasses

    from .train import TrainConfig

    from onnxformer.runtime.errors import ConfigError

    if args.from_checkpoint is not None:  # the checkpoint fixes the model and tokenizer: these would be ignored
        ignored = [option for option, value in (("--vocab-size", args.vocab_size), ("--preset", args.preset))
                   if value is not None]
        if ignored:
            raise ConfigError(
                f"{' and '.join(ignored)} cannot change a model loaded with --from-checkpoint (it keeps the "
                f"checkpoint's size, tokenizer and vocabulary); drop {' and '.join(ignored)}"
            )
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {}
    for dest, value in vars(args).items():
        name = _FIELD_OF.get(dest, dest)
        if value is None or name not in fields:
            continue
        values[name] = (not value) if dest == "no_progress" else value
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    from .train import train

    # What the data files were read as (format, kind, field mapping, layout) is shown without -v.
    for name in ("onnxformer.runtime.datafiles", "onnxformer.modeling.data"):
        logging.getLogger(name).setLevel(logging.INFO)

    # Bad options, data or run directory raise ConfigError, DataError or CheckpointError, which
    # the `onnxformer` entry point prints as `error[CODE]: ...` (status 2); anything else is a bug.
    result = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    if result.already_finished:
        print(f"{result.run_dir} already finished at step {result.step} (--steps {result.step}); nothing was "
              f"trained. To train further, resume with more steps: --resume --steps {2 * result.step}")
        return 0
    if result.metrics:
        print(" ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()) if not k.endswith("examples")))
    print(f"trained {result.step} steps in {result.wall_time_s:.1f}s; checkpoint: {result.checkpoint}")
    return 0
