"""The command line on the new families: a saved tiny LTX-Video pipeline folder through
``fastdit generate --model``, the family's size rule, and ``fastdit info``'s family list."""

import pytest
import torch

from tests.pipelines.family_helpers import reference_backend  # noqa: F401 (autouse fixture)
from fastdit import cli

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def ltx_folder(tmp_path_factory):
    """A complete LTXPipeline (tiny T5, word-level tokenizer, VAE, transformer) saved to disk."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline
    from transformers import T5Config, T5EncoderModel

    from fastdit.testing.tiny import TINY_VOCAB, build_tiny_tokenizer
    from tests.pipelines.test_family_ltx_video import tiny_transformer, tiny_vae

    tokenizer = build_tiny_tokenizer(model_max_length=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(TINY_VOCAB), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        ))
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=text_encoder.eval(),
                       tokenizer=tokenizer, transformer=tiny_transformer())
    folder = tmp_path_factory.mktemp("models") / "ltx-tiny"
    pipe.save_pretrained(folder)
    return str(folder)


def test_generate_picks_the_family_adapter(ltx_folder, tmp_path, capsys):
    out = tmp_path / "ltx.mp4"
    argv = ["generate", "--model", ltx_folder, "--height", "160", "--width", "320", "--num-frames", "17",
            "--steps", "2", "--attention", "gna", "--attention-opt", "window=3,3,5", "--attention-opt",
            "block_size=64", "--seed", "0", "-o", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "LTXPipeline" in text and "density" in text and out.exists()


def test_generate_checks_the_family_size_rule(ltx_folder, tmp_path, capsys):
    # 13 frames is 4k+1 (Wan's rule) but not 8k+1 (LTX-Video's VAE).
    argv = ["generate", "--model", ltx_folder, "--height", "160", "--width", "320", "--num-frames", "13",
            "-o", str(tmp_path / "never.mp4")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "LTX-Video: num_frames must be of the form 8k+1" in err and "Traceback" not in err


def test_info_lists_the_families(capsys):
    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for family, model in [
        ("HunyuanVideo 1.5", "HunyuanVideo15Transformer3DModel"), ("Wan VACE", "WanVACETransformer3DModel"),
        ("SkyReels-V2", "SkyReelsV2Transformer3DModel"), ("LTX-Video", "LTXVideoTransformer3DModel"),
        ("CogVideoX", "CogVideoXTransformer3DModel"), ("Mochi", "MochiTransformer3DModel"),
        ("Flux.1", "FluxTransformer2DModel"), ("QwenImage", "QwenImageTransformer2DModel"),
    ]:
        assert any(line.split() and family in line and model in line for line in out.splitlines()), family
