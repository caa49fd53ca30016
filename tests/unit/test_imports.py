import subprocess
import sys


def test_import_vitdit_does_not_import_ray_or_mlflow():
    code = (
        "import sys, vitdit, vitdit.latents, vitdit.digits, vitdit.errors\n"
        "import pkgutil, importlib\n"
        "for m in pkgutil.walk_packages(vitdit.__path__, 'vitdit.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'pipelines', 'jobs'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"vitdit imported: {out.stdout.strip()}"


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("quickstart", "encode", "train dit", "train vit", "train vae", "sample", "evaluate"):
        assert cmd in out.stdout


def test_modules_of_ray_data_udfs_do_not_import_torch():
    """Ray Data runs these modules' UDFs (image decoding, the latents' id split) in fresh worker
    processes; importing torch there costs each process seconds (pipelines/latents.SplitById)."""
    code = (
        "import sys, vitdit, vitdit.errors, vitdit.latents, vitdit.preprocess\n"
        "import pipelines.images, pipelines.latents\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    lazy = subprocess.run(
        [sys.executable, "-c", "import vitdit; print(vitdit.create_model.__module__)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert lazy.stdout.strip() == "vitdit.models"


def test_vit_model_does_not_import_the_converters():
    """The dependency runs one way, convert → models.vit: building a ViT and loading a timm-layout
    state dict into it (what needs the key normalisation) import no converter module."""
    code = (
        "import sys\n"
        "from vitdit.models.vit import VIT_PRESETS, ViT\n"
        "model = ViT(VIT_PRESETS['ViT-test/4'])\n"
        "model.load_pretrained({'module.' + k: v for k, v in model.state_dict().items()})\n"
        "print('vitdit.convert' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_recipe_planning_imports_no_job_module():
    """pipelines.recipe runs stages through what its caller gives it: planning and the runner
    factory import nothing from jobs/ (imports go jobs → pipelines)."""
    code = (
        "import sys\n"
        "from pipelines.recipe import in_process_runner, parse_recipe, plan, stage_command\n"
        "from pipelines.quickstart import build_recipe\n"
        "r = parse_recipe(build_recipe('/tmp/w', None, smoke_test=True))\n"
        "cmds = [stage_command(s, argv) for s, argv, _ in plan(r, strict=False)]\n"
        "in_process_runner('jobs')\n"
        "print(len(cmds), sorted(m for m in sys.modules if m == 'jobs' or m.startswith('jobs.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "7 []"
