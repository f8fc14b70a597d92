"""Any image the server accepts fits the critic's context: the token count of the largest images, the
longest prompt and the answer budget against the default --max-model-len, counted by the processor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from server.assembly import build_service
from server.images import MAX_ASPECT_RATIO, QWEN3_VL_MAX_PIXELS, fit_to_budget, max_vision_tokens
from server.metrics import Metrics
from server.settings import TEMPLATE_TOKENS, TEXT_TOKENS, Settings
from server.tasks import SERVER_TASKS

# width:height of the images tried: square, landscape, portrait, and very elongated
SHAPES = [(1, 1), (4, 3), (1, 7), (MAX_ASPECT_RATIO / 2, 1)]


def _sized(pixels: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """(width, height) of an image of about `pixels` pixels with the ratio, at least one pixel a side."""
    w, h = ratio
    height = max(1, round(math.sqrt(pixels * h / w)))
    return max(1, min(round(pixels / height), int(MAX_ASPECT_RATIO * height))), height


# budgets whose most elongated images keep a short side of at least one 32-pixel cell, as every accepted image does
# at the real cap of 4096 x 4096
@pytest.mark.parametrize("budget", [480 * 480, 512 * 640])
def test_the_bound_holds_for_what_the_processor_really_makes(tiny_checkpoint: Path, budget: int) -> None:
    """The tiny critic's processor (Qwen3-VL's own class and grid) with its pixel cap set to the budget, as the
    real one's is at 4096 x 4096: every image the server fits to the budget costs at most the bound."""
    processor = AutoProcessor.from_pretrained(tiny_checkpoint).image_processor
    merge = processor.merge_size
    for ratio in SHAPES:
        for pixels in (budget, 4 * budget):  # one at the budget, one the server must downscale
            image = fit_to_budget(Image.new("RGB", _sized(pixels, ratio), "red"), budget)
            grid = processor(images=[image], size={"shortest_edge": 32 * 32, "longest_edge": budget})["image_grid_thw"]
            tokens = int(grid.prod()) // merge**2 + 2  # with the vision start and end tokens
            bound = max_vision_tokens(
                budget, patch_size=processor.patch_size, merge_size=merge, processor_max_pixels=budget
            )
            assert tokens <= bound, (image.size, tokens, bound)


def test_the_largest_accepted_item_fits_the_default_context() -> None:
    """At the real processor's scale: the 4096 x 4096 cap gives 16,384 tokens an image by the processor's own
    resize, and each task's images, longest prompt and answer budget fit the derived --max-model-len."""
    settings = Settings()
    cell = 16 * 2
    for ratio in SHAPES:
        h, w = smart_resize(*reversed(_sized(QWEN3_VL_MAX_PIXELS, ratio)), factor=cell, max_pixels=QWEN3_VL_MAX_PIXELS)
        assert h * w // cell**2 + 2 <= max_vision_tokens(settings.image_pixel_budget)
    assert max_vision_tokens(QWEN3_VL_MAX_PIXELS) == 4096 * 4096 // cell**2 + 2
    for name, task in SERVER_TASKS.items():
        largest = task.images_per_prompt * max_vision_tokens(settings.image_pixel_budget)
        assert largest + TEMPLATE_TOKENS + TEXT_TOKENS + task.max_new_tokens <= settings.context_length(), name
    # the budgets and the pixel budget move the default with them
    assert Settings(image_pixel_budget=512 * 512).context_length() < settings.context_length()


def test_a_context_that_cannot_hold_the_largest_images_is_refused_at_start(tmp_path: Path) -> None:
    settings = Settings(
        engine="vllm", edit_model="my/critic", gen_model="none", prompts="own", cache_dir=tmp_path, max_model_len=16384
    )
    with pytest.raises(ValueError) as refused:
        build_service(settings, Metrics())
    needed = settings.context_needed("edit", text=False)
    assert (
        f"--max-model-len 16384 cannot hold the largest images and answer of a call of the edit critic: {needed} tokens"
        in str(refused.value)
    )
    assert "--image-pixel-budget 16777216" in str(refused.value)


def test_a_context_longer_than_the_model_holds_is_refused_in_words(tiny_checkpoint: Path) -> None:
    """The vllm engine reads the checkpoint's own context before starting vLLM (the tiny critic: 32,768)."""
    from server.engines.base import EngineError
    from server.engines.vllm import VLLMEngine

    engine = VLLMEngine(str(tiny_checkpoint), ("1", "2", "3", "4", "5"), max_model_len=Settings().context_length())
    with pytest.raises(EngineError, match=r"more than .*'s context of 32768 tokens: lower --image-pixel-budget"):
        engine._check_context()
    VLLMEngine(str(tiny_checkpoint), ("1",), max_model_len=32768)._check_context()  # what fits passes
