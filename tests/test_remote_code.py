"""Saved pipeline folders (and the bundled one) load without this package: `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)` and `AutoModel.from_pretrained(folder + "/model", trust_remote_code=True)` run the code
saved in the folder, which must be the package's own.

Each load runs in a subprocess where importing `progressive_denoising` fails (a meta-path finder refuses it), from a
temporary directory, with a temporary `HF_MODULES_CACHE`: the conditions of an environment with torch, transformers,
diffusers and safetensors only.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.dynamic_module_utils import get_relative_import_files

import progressive_denoising
from progressive_denoising import PDMPipeline
from progressive_denoising import BUNDLED_MODEL

from tiny import tiny_model, tiny_tokenizer, tiny_vqmodel

PACKAGE = Path(progressive_denoising.__file__).parent
PROMPTS = ["a small red circle", "a large blue square left of a small green triangle"]

LOAD_SCRIPT = textwrap.dedent(
    '''
    import json
    import sys

    folder, prompts, steps, output = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    blocked = sys.argv[5] == "blocked"
    if blocked:
        class RefusePackage:
            """Importing the package fails, as where it is not installed."""

            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "progressive_denoising":
                    raise ImportError(f"{name} is not installed here")

        sys.meta_path.insert(0, RefusePackage())
        try:
            import progressive_denoising  # noqa: F401
            raise SystemExit("the package is still importable")
        except ImportError:
            pass

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline
    from transformers import AutoModel

    report = {}
    if not blocked:  # the folder's code only runs when asked to
        try:
            DiffusionPipeline.from_pretrained(folder)
        except ValueError as error:
            report["without_trust"] = str(error)

    generators = lambda: [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    codes = pipe(prompts, num_inference_steps=steps, generator=generators(), output_type="codes").images
    images = pipe(prompts, num_inference_steps=steps, generator=generators(), output_type="np").images
    model = AutoModel.from_pretrained(folder + "/model", trust_remote_code=True)
    tokens = pipe.tokenizer(prompts, padding=True, return_tensors="pt")
    model_codes = model.generate(tokens.input_ids, tokens.attention_mask, num_stages=steps, generator=generators())
    np.savez(output, codes=codes.numpy(), images=images, model_codes=model_codes.numpy())
    report.update(
        pipeline=type(pipe).__module__, pipeline_model=type(pipe.model).__module__, model=type(model).__module__,
        package_modules=sorted(name for name in sys.modules if name.startswith("progressive_denoising")),
    )
    print("REPORT", json.dumps(report))
    '''
)


def load_in_subprocess(folder, tmp_path, steps, blocked=True):
    """Runs LOAD_SCRIPT on `folder`; returns its report and arrays."""
    script, output = tmp_path / "load.py", tmp_path / "loaded.npz"
    script.write_text(LOAD_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, str(script), str(folder), json.dumps(PROMPTS), str(steps), str(output),
         "blocked" if blocked else "importable"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    return report, dict(np.load(output))


def package_outputs(pipe, steps):
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    pipe.set_progress_bar_config(disable=True)
    codes = pipe(PROMPTS, num_inference_steps=steps, generator=generators(), output_type="codes").images
    images = pipe(PROMPTS, num_inference_steps=steps, generator=generators(), output_type="np").images
    tokens = pipe.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    model_codes = pipe.model.generate(tokens.input_ids, tokens.attention_mask, num_stages=steps, generator=generators())
    return codes.numpy(), images, model_codes.numpy()


def assert_same_outputs(loaded, expected):
    codes, images, model_codes = expected
    np.testing.assert_array_equal(loaded["codes"], codes)
    np.testing.assert_array_equal(loaded["model_codes"], model_codes)
    np.testing.assert_allclose(loaded["images"], images, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def pipe():
    return PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel())


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(folder)
    return folder


def test_saved_pipeline_loads_without_the_package(pipe, saved, tmp_path):
    report, loaded = load_in_subprocess(saved, tmp_path, steps=4)
    assert report["package_modules"] == []
    assert report["pipeline"] == "diffusers_modules.local.pipeline_pdm"
    assert report["pipeline_model"] == "diffusers_modules.local.modeling_pdm"
    assert report["model"].startswith("transformers_modules.") and report["model"].endswith(".modeling_pdm")
    assert_same_outputs(loaded, package_outputs(pipe, steps=4))


def test_diffusion_pipeline_loads_a_saved_folder_where_the_package_is_installed(pipe, saved, tmp_path):
    report, loaded = load_in_subprocess(saved, tmp_path, steps=3, blocked=False)
    assert "trust_remote_code=True" in report["without_trust"]
    assert_same_outputs(loaded, package_outputs(pipe, steps=3))


def test_bundled_pipeline_saved_again_loads_without_the_package(tmp_path):
    """The bundled folder ships inside the package and holds no code; saving it writes the code people without the
    package receive (what a Hub upload holds)."""
    bundled = PDMPipeline.from_pretrained(BUNDLED_MODEL)
    folder = tmp_path / "bundled-saved"
    bundled.save_pretrained(folder)
    assert (folder / "model" / "generation_config.json").is_file()
    report, loaded = load_in_subprocess(folder, tmp_path, steps=4)
    assert report["package_modules"] == [] and report["pipeline"] == "diffusers_modules.local.pipeline_pdm"
    assert_same_outputs(loaded, package_outputs(bundled, steps=4))


def expected_code_files():
    """{path in a saved folder: the package file it must copy}: this pipeline file beside `model_index.json`, and the
    model's module with every module it imports, recursively, in `model/`."""
    files = {"pipeline_pdm.py": PACKAGE / "pipeline_pdm.py"}
    for path in [PACKAGE / "modeling_pdm.py", *map(Path, get_relative_import_files(PACKAGE / "modeling_pdm.py"))]:
        files[f"model/{path.name}"] = path
    return files


def code_files(folder):
    return {str(path.relative_to(folder)) for path in Path(folder).rglob("*.py")}


def test_saved_folder_carries_the_package_code(saved):
    expected = expected_code_files()
    assert code_files(saved) == set(expected)
    assert {"model/configuration_pdm.py", "model/ordering.py"} <= set(expected)
    for name, source in expected.items():
        assert (saved / name).read_bytes() == source.read_bytes(), name


def test_bundled_folder_holds_no_copy_of_the_source():
    """Weights, configs and the card only: no source file exists twice in the repository."""
    bundled = Path(BUNDLED_MODEL)
    assert code_files(bundled) == set()
    auto_map = json.loads((bundled / "model" / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_pdm.PDMConfig", "AutoModel": "modeling_pdm.PDMForTextToImage"}
