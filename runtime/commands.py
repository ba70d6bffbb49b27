"""Runtime subcommands: inspect, generate, classify, embed. Torch-free.

Texts come from the command line or, when none are given, from standard input (one per
line). `--json` prints machine-readable output (one JSON document). `generate --chat` sends
each text as a user message in the package's chat template; `--messages` sends a whole
conversation (a JSON array of {"role", "content"}); `--render` prints the rendered prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import InputError


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("package", help="package directory (manifest.json, tokenizer.json, *.onnx)")
    if command == "inspect":
        parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
        return
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="input texts; read from stdin (one per line) if none")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime execution provider")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's choice)")
    parser.add_argument("--trust-store", action="append", default=None, metavar="PATH",
                        help="allow the package's files to be links into this content store (repeatable)")
    parser.add_argument("--truncate", action="store_true", help="truncate inputs longer than the model's maximum")
    if command == "generate":
        g = parser.add_argument_group("generation")
        g.add_argument("--strategy", choices=["greedy", "sample", "beam"], default=None, help="decoding strategy (default greedy)")
        g.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most")
        g.add_argument("--min-new-tokens", type=int, default=None, help="tokens to generate before eos is allowed")
        g.add_argument("--temperature", type=float, default=None, help="sampling temperature (> 0)")
        g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0 = off)")
        g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (1 = off)")
        g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
        g.add_argument("--num-beams", type=int, default=None, help="beams for --strategy beam")
        g.add_argument("--length-penalty", type=float, default=None, help="beam score = logprob / length**penalty")
        g.add_argument("--num-return-sequences", type=int, default=None, help="sequences per prompt (beam, sample)")
        g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (1 = off)")
        g.add_argument("--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram of this size")
        g.add_argument("--stop", action="append", default=None, metavar="STRING", help="stop at this string (repeatable)")
        g.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
        g.add_argument("--raw", action="store_true",
                       help="send prompts exactly as given, without the package's prompt format")
        c = parser.add_argument_group("chat (packages with a chat template, e.g. Hugging Face chat models)")
        c.add_argument("--chat", action="store_true",
                       help="send each TEXT as a user message in the package's chat template (one conversation each)")
        c.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message before each")
        c.add_argument("--messages", default=None, metavar="JSON|FILE",
                       help='one conversation: a JSON array of {"role": ..., "content": ...} messages, inline '
                            "(starting with '[') or in a file ('-': stdin); implies --chat")
        c.add_argument("--render", action="store_true",
                       help="print the rendered chat prompt (with --json, its token ids too) instead of generating")
    if command == "embed":
        parser.add_argument("--pooling", choices=["mean", "cls"], default=None,
                            help="how to pool token states (default: the package's, else mean)")
        norm = parser.add_mutually_exclusive_group()
        norm.add_argument("--normalize", dest="normalize", action="store_const", const=True, default=None,
                          help="L2-normalise the embeddings (default: the package's, else yes)")
        norm.add_argument("--no-normalize", dest="normalize", action="store_const", const=False,
                          help="do not L2-normalise the embeddings")


def _texts(args: argparse.Namespace) -> list[str]:
    if args.texts:
        for i, text in enumerate(args.texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates
                raise InputError(f"text argument {i + 1} is not valid UTF-8; pass UTF-8 text (e.g. convert it "
                                 "with iconv -f latin1 -t utf-8)") from None
        return args.texts
    if sys.stdin is None or sys.stdin.isatty():
        raise InputError("no input texts: pass them as arguments or pipe them on stdin (one per line)")
    try:
        # A line ends at \n; a \r before it (Windows line endings) is no part of the text.
        texts = [line.rstrip("\n").removesuffix("\r") for line in sys.stdin if line.strip()]
    except UnicodeDecodeError as err:
        raise InputError(f"stdin is not valid UTF-8 ({err.reason} at byte {err.start} of a read block); "
                         "pipe UTF-8 text, one input per line") from None
    if not texts:
        raise InputError("stdin had no non-empty lines; pass at least one text")
    return texts


def _conversations(args: argparse.Namespace) -> list[list[dict]]:
    """The conversations of `generate --chat` / `--messages` (checked again by the model)."""
    if args.raw or args.truncate:
        raise InputError(f"{'--raw' if args.raw else '--truncate'} does not apply to a chat: a conversation is sent as "
                         "its template renders it; drop it")
    if args.messages is None:
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        return [[*system, {"role": "user", "content": text}] for text in _texts(args)]
    if args.texts or args.system is not None:
        raise InputError("--messages holds the whole conversation; pass no TEXT and no --system with it")
    source = args.messages
    if not source.lstrip().startswith("["):
        try:
            source = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"--messages {args.messages!r}: cannot read it ({getattr(err, 'strerror', None) or err}); "
                             "pass a JSON array inline or the path of a UTF-8 JSON file") from None
    try:
        messages = json.loads(source)
    except json.JSONDecodeError as err:
        raise InputError(f"--messages is not valid JSON ({err}); pass an array such as "
                         '[{"role": "user", "content": "hi"}]') from None
    return [messages]


def _chat(model, args: argparse.Namespace, overrides: dict) -> int:
    conversations = _conversations(args)
    if args.render:
        prompts = [model.render_chat(messages) for messages in conversations]
        if args.json:
            print(json.dumps([{"messages": m, "text": p.text, "token_ids": p.token_ids}
                              for m, p in zip(conversations, prompts)], ensure_ascii=False))
        else:
            for p in prompts:
                print(p.text)
        return 0
    if args.stream:
        if len(conversations) != 1:
            raise InputError(f"--stream takes one conversation; got {len(conversations)}. Pass one, or drop --stream")
        for piece in model.stream_chat(conversations[0], **overrides):
            print(piece, end="", flush=True)
        print()
        return 0
    results = [model.chat(messages, **overrides) for messages in conversations]
    _print_generations(results, args.json)
    return 0


def _print_generations(results: list, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"prompt": r.prompt, "texts": r.texts, "token_ids": r.token_ids, "scores": r.scores,
                           "finish_reasons": r.finish_reasons} for r in results], ensure_ascii=False))
    else:
        for r in results:
            for text in r.texts:
                print(text)


def _generation_overrides(args: argparse.Namespace) -> dict:
    names = ["strategy", "max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "seed", "num_beams",
             "length_penalty", "num_return_sequences", "repetition_penalty", "no_repeat_ngram_size"]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.stop:
        overrides["stop_strings"] = tuple(args.stop)
    if overrides.get("num_beams", 1) > 1 and "strategy" not in overrides:
        overrides["strategy"] = "beam"
    return overrides


def _inspect(args: argparse.Namespace) -> int:
    from .manifest import Manifest

    directory = Path(args.package)
    manifest = Manifest.load(directory)
    manifest.verify_files(directory)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
        return 0
    d = manifest.dims
    params = manifest.model_config.get("num_parameters")
    print(f"package      {directory}")
    print(f"architecture {manifest.arch}" + (f"  ({params:,} parameters)" if isinstance(params, int) else ""))
    print(f"dimensions   d_model {d.d_model}, heads {d.n_heads} (kv {d.n_kv_heads}), head size {d.d_head}, "
          f"decoder layers {d.n_layers}, vocab {d.vocab_size}, max_seq_len {manifest.max_seq_len}")
    print(f"weights      {manifest.weights} (float I/O {manifest.float_dtype}), opset {manifest.opset}")
    special = ", ".join(f"{k}={v}" for k, v in manifest.special_tokens.items() if v >= 0)
    print(f"special      {special}")
    if manifest.label_names:
        print(f"labels       {', '.join(manifest.label_names)}")
    if manifest.source:
        names = ", ".join(manifest.source.get("architectures", []))
        print(f"source       {manifest.source.get('format', '?')} {manifest.source.get('model_type', '')}"
              + (f" ({names})" if names else ""))
    if manifest.chat_template is not None:
        print(f"chat         template of {len(manifest.chat_template)} characters (generate --chat)")
    if manifest.embedding is not None:
        pooling, normalize = manifest.embedding_defaults()
        print(f"embedding    {pooling} pooling, {'normalised' if normalize else 'not normalised'}")
    if manifest.prompt_format:
        print(f"prompts      {manifest.prompt_format.template!r}" + (" (stripped)" if manifest.prompt_format.strip else ""))
    for name, entry in manifest.graphs.items():
        size = entry.file.bytes + sum(e.bytes for e in entry.external_data)
        print(f"\n{entry.file.file}  {size / 1e6:.2f} MB  sha256 {entry.file.sha256[:16]}")
        for kind, tensors in (("in ", entry.spec.inputs), ("out", entry.spec.outputs)):
            shown = tensors if len(tensors) <= 8 else [*tensors[:6], None, tensors[-1]]
            for t in shown:
                if t is None:
                    print(f"  {kind}  ... ({len(tensors) - 7} more cache tensors)")
                else:
                    print(f"  {kind}  {t.name:34s} {t.dtype:8s} [{', '.join(map(str, t.shape))}]")
    for variant, figures in manifest.validation.items():  # free-form figures: show what has the expected type
        worst = figures.get("worst_abs_diff") if isinstance(figures, dict) else None
        if not isinstance(worst, (int, float)):
            continue
        line = f"\nvalidation   {variant}: max |onnx - torch| {worst:.2e}"
        if "greedy_match" in figures and isinstance(figures.get("greedy_tokens_compared"), int):
            line += f", greedy {'matches' if figures['greedy_match'] else 'differs'} ({figures['greedy_tokens_compared']} tokens)"
        print(line.rstrip())
    return 0


def _warn_unknown(fractions: list[float], consequence: str) -> None:
    """On stderr, for each text mostly unknown to the tokenizer: what it means and what to do."""
    from .model import UNKNOWN_WARNING

    for i, share in enumerate(fractions):
        if share > UNKNOWN_WARNING:
            print(f"warning: text {i}: {int(share * 100 + 0.5)}% of its tokens are unknown to this model's tokenizer (characters "
                  f"or words never seen in training: another script, emoji, other casing); {consequence}. "
                  "Write the text the way the training data is written, or fine-tune the model on text like it.",
                  file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        return _inspect(args)
    from . import load

    chat = args.command == "generate" and (args.chat or args.messages is not None)
    if args.command == "generate" and not chat and (args.system is not None or args.render):
        raise InputError(f"{'--system' if args.system is not None else '--render'} applies to a chat; add --chat "
                         "(each TEXT a user message) or --messages")
    texts = [] if chat else _texts(args)
    model = load(args.package, provider=args.provider, threads=args.threads, trusted_roots=args.trust_store)
    if chat:
        return _chat(model, args, _generation_overrides(args))
    if args.command == "classify":
        results = model.classify(texts, truncate=args.truncate)
        if args.json:
            print(json.dumps([{"text": t, "label": r.label, "score": r.score, "probabilities": r.probabilities,
                               "unknown_fraction": r.unknown_fraction} for t, r in zip(texts, results)],
                             ensure_ascii=False))
        else:
            for t, r in zip(texts, results):
                print(f"{r.label}\t{r.score:.4f}\t{t}")
            _warn_unknown([r.unknown_fraction for r in results], "its label is a guess")
        return 0
    if args.command == "embed":
        vectors = model.embed(texts, pooling=args.pooling, normalize=args.normalize, truncate=args.truncate)
        unknown = model.unknown_fractions(texts)
        if args.json:
            print(json.dumps([{"text": t, "embedding": [round(float(x), 6) for x in v], "unknown_fraction": u}
                              for t, v, u in zip(texts, vectors, unknown)], ensure_ascii=False))
        else:
            for t, v in zip(texts, vectors):
                print(" ".join(f"{x:.6f}" for x in v))
            _warn_unknown(unknown, "its embedding says little about it")
        return 0
    overrides = _generation_overrides(args)
    if args.stream:
        if len(texts) != 1:
            raise InputError(f"--stream takes one prompt; got {len(texts)}. Pass one, or drop --stream")
        for piece in model.stream(texts[0], truncate=args.truncate, raw=args.raw, **overrides):
            print(piece, end="", flush=True)
        print()
        return 0
    _print_generations(model.generate(texts, truncate=args.truncate, raw=args.raw, **overrides), args.json)
    return 0
