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
