"""The ``vitdit`` console command: a thin front over the modules in ``jobs/``.

Sub-commands are imported only when run, so ``vitdit --help`` is fast and needs no Ray.
"""

from __future__ import annotations

import importlib
import sys

# (words, module, one-line help). Longer word sequences match first.
COMMANDS: list[tuple[str, str, str]] = [
    ("quickstart", "jobs.quickstart", "run every stage on the bundled digits, locally, in minutes"),
    ("data digits", "jobs.data_digits", "write scikit-learn's handwritten digits as an ImageFolder tree"),
    ("data numbers", "jobs.data_numbers", "write two-digit numbers captioned in words (text-to-image data)"),
    ("encode", "jobs.encode_latents", "encode images into a latent data set with a VAE (Ray Data)"),
    ("train vae", "jobs.train_vae", "train a small AutoencoderKL (Ray Train)"),
    ("train vit", "jobs.train_vit", "train a ViT classifier on images (Ray Train)"),
    ("train dit", "jobs.train_dit", "train a DiT on a latent data set (Ray Train)"),
    ("train mmdit", "jobs.train_mmdit", "train an MM-DiT (SD3) on a captioned latent data set (Ray Train)"),
    (
        "sample",
        "jobs.sample",
        "generate samples from a DiT (--classes) or MM-DiT (--prompt) checkpoint (Ray Data)",
    ),
    ("export", "jobs.export", "write a diffusers DiTPipeline directory from a DiT checkpoint"),
    ("evaluate", "jobs.evaluate", "evaluate samples; --watch evaluates every new checkpoint of a run"),
    ("submit", "jobs.submit", "submit a job in jobs/ to a Ray cluster and stream its logs"),
    ("pipeline", "jobs.pipeline", "run encode → train → sample → evaluate from a YAML recipe"),
    ("models", "jobs.models", "list model presets with parameter counts and forward GMACs"),
]


def _usage() -> str:
    lines = ["usage: vitdit <command> [<args>]", "", "commands:"]
    width = max(len(w) for w, _, _ in COMMANDS)
    for words, _, text in COMMANDS:
        lines.append(f"  {words.ljust(width)}  {text}")
    lines += ["", "Each command takes --help. Errors exit 2 with a message naming the bad input."]
    return "\n".join(lines)


def _group_usage(group: str) -> str:
    subs = [(w, t) for w, _, t in COMMANDS if w.startswith(group + " ")]
    lines = [f"usage: vitdit {group} {{{','.join(w.split()[1] for w, _ in subs)}}} [<args>]", ""]
    lines += [f"  {w}  {t}" for w, t in subs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    for words, module, _ in sorted(COMMANDS, key=lambda c: -len(c[0].split())):
        parts = words.split()
        if argv[: len(parts)] == parts:
            mod = importlib.import_module(module)
            return int(mod.main(argv[len(parts) :], prog=f"vitdit {words}") or 0)
    groups = {w.split()[0] for w, _, _ in COMMANDS if len(w.split()) > 1}
    if argv[0] in groups:
        print(
            _group_usage(argv[0]),
            file=sys.stdout if len(argv) > 1 and argv[1] in ("-h", "--help") else sys.stderr,
        )
        return 0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2
    print(f"vitdit: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
