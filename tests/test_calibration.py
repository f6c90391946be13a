import json

import numpy as np
import pytest
import torch
from PIL import Image

from qvlm.calibration import (
    CalibrationError,
    CalibrationRecord,
    load_records,
    make_batches,
    make_pixel_batches,
)
from qvlm.shapes import SHAPES_VOCAB, ShapesSpec, make_shapes_records
from qvlm.tiny import build_shapes_image_processor, build_shapes_tokenizer, make_tiny_llava

IMAGE_TOKENS = (32 // 8) ** 2 + 1 - 1  # patches + CLS, minus CLS for the "default" strategy


@pytest.fixture(scope="module")
def llava_processor():
    return make_tiny_llava()[1]


@pytest.fixture(scope="module")
def tokenizer():
    return build_shapes_tokenizer()


def _signature(records):
    return [(r.text, r.answer, np.asarray(r.image).tobytes()) for r in records]


# --- shapes -------------------------------------------------------------------------------------


def test_shapes_deterministic_per_seed_and_differ_across_seeds():
    assert _signature(make_shapes_records(12, seed=3)) == _signature(make_shapes_records(12, seed=3))
    assert _signature(make_shapes_records(12, seed=3)) != _signature(make_shapes_records(12, seed=4))


def test_shapes_words_and_answers_in_vocab():
    records = make_shapes_records(60, seed=0)
    assert all(r.answer in SHAPES_VOCAB for r in records)
    assert all(w in SHAPES_VOCAB for r in records for w in r.text.split())
    assert {r.text for r in records} == {"what color is the shape ?", "what shape is it ?", "where is the shape ?"}
    assert len({r.answer for r in records}) >= 8  # colours, shapes and positions all show up


def test_shapes_image_size_and_mode():
    record = make_shapes_records(1, seed=0, image_size=48)[0]
    assert record.image.size == (48, 48) and record.image.mode == "RGB"
    assert len(np.unique(np.asarray(record.image).reshape(-1, 3), axis=0)) >= 2  # a shape was drawn


def test_shapes_image_colour_matches_answer():
    records = [r for r in make_shapes_records(40, seed=1) if r.text.startswith("what color")]
    expected = {"red": 0, "green": 1, "blue": 2}  # dominant channel of these colours
    checked = 0
    for r in records:
        if r.answer in expected:
            pixels = np.asarray(r.image).reshape(-1, 3).astype(int)
            shape_pixels = pixels[np.abs(pixels - 245).sum(1) > 60]
            assert shape_pixels.mean(0).argmax() == expected[r.answer]
            checked += 1
    assert checked > 0


def test_shapes_spec_noise_changes_images_and_rejects_unknown_values():
    plain = make_shapes_records(3, seed=0)
    noisy = make_shapes_records(3, seed=0, spec=ShapesSpec(noise=20.0))
    assert [r.answer for r in plain] == [r.answer for r in noisy]
    assert _signature(plain) != _signature(noisy)
    with pytest.raises(ValueError, match="magenta"):
        ShapesSpec(colors=("magenta",))


# --- load_records -------------------------------------------------------------------------------


def test_builtin_source_and_unknown_builtin():
    records = load_records("builtin:shapes", samples=7, seed=2)
    assert len(records) == 7 and _signature(records) == _signature(make_shapes_records(7, 2))
    with pytest.raises(CalibrationError, match="builtin:shapes"):
        load_records("builtin:nope", samples=2, seed=0)


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_relative_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("L", (10, 6), 128).save(tmp_path / "imgs" / "a.png")
    path = _write_jsonl(tmp_path / "data.jsonl", [
        {"image": "imgs/a.png", "text": "what color is the shape ?", "answer": "red"},
        "",
        {"image": None, "text": "hello"},
        {"text": "where is the shape ?"},
    ])
    records = load_records(str(path), samples=3, seed=0)
    assert records[0].image.mode == "RGB" and records[0].image.size == (10, 6)
    assert records[0].answer == "red"
    assert records[1] == CalibrationRecord(text="hello") and records[2].answer is None


def test_jsonl_subset_is_seeded_and_keeps_file_order(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}"} for i in range(10)])
    pick = lambda seed: [int(r.text[1:]) for r in load_records(str(path), samples=4, seed=seed)]
    assert pick(5) == pick(5)
    assert pick(5) == sorted(pick(5)) and len(set(pick(5))) == 4
    assert len({tuple(pick(s)) for s in range(6)}) > 1


def _bad_cases(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    good = {"text": "ok"}
    return {
        "invalid_json": ([good, '{"text": "x"'], 2, "invalid JSON"),
        "missing_text": ([good, good, {"answer": "red"}], 3, '"text"'),
        "empty_text": ([{"text": "  "}], 1, '"text"'),
        "text_not_string": ([good, {"text": 5}], 2, '"text"'),
        "image_missing": ([good, {"image": "nowhere.png", "text": "x"}], 2, "nowhere.png"),
        "image_unreadable": ([{"image": "broken.png", "text": "x"}], 1, "broken.png"),
        "unknown_key": ([good, {"text": "x", "caption": "y"}], 2, "caption"),
        "not_object": ([good, "[1, 2]"], 2, "JSON object"),
    }


BAD_CASES = ["invalid_json", "missing_text", "empty_text", "text_not_string", "image_missing",
             "image_unreadable", "unknown_key", "not_object"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_jsonl_errors_name_file_and_line(tmp_path, case):
    rows, line, detail = _bad_cases(tmp_path)[case]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CalibrationError) as info:
        load_records(str(path), samples=1, seed=0)
    message = str(info.value)
    assert str(path) in message and f"line {line}" in message and detail in message
    assert "fix" in message


def test_jsonl_missing_file_and_too_few_records(tmp_path):
    with pytest.raises(CalibrationError, match="absent.jsonl.*not found"):
        load_records(str(tmp_path / "absent.jsonl"), samples=1, seed=0)
    path = _write_jsonl(tmp_path / "few.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(CalibrationError, match=r"few.jsonl has 2 records, job asks for samples=5"):
        load_records(str(path), samples=5, seed=0)


# --- make_batches -------------------------------------------------------------------------------


def _mixed_questions():
    """Five records whose questions alternate in length (5 and 4 words), so batches need padding."""
    pool = make_shapes_records(40, seed=0)
    long = [r for r in pool if r.text.startswith("what color")]
    short = [r for r in pool if not r.text.startswith("what color")]
    return [long[0], short[0], short[1], long[1], long[2]]


def test_llava_batches_shapes_padding_and_image_tokens(llava_processor):
    records = _mixed_questions()
    batches = make_batches(records, llava_processor, max_length=64, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    pad_id = llava_processor.tokenizer.pad_token_id
    for start, batch in zip(range(0, 5, 2), batches):
        assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
        assert batch["pixel_values"].shape == (batch["input_ids"].shape[0], 3, 32, 32)
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        for row, mask, record in zip(batch["input_ids"], batch["attention_mask"], records[start:]):
            n = int(mask.sum())
            # <s> + image tokens + question words + answer
            assert n == 1 + IMAGE_TOKENS + len(record.text.split()) + 1
            assert mask[:n].all() and not mask[n:].any()
            assert (row[n:] == pad_id).all()
            assert int((row == llava_processor.image_token_id).sum()) == IMAGE_TOKENS
    assert all((b["attention_mask"] == 0).any() for b in batches[:2])  # questions differ in length


def test_include_answer_adds_the_answer_tokens(llava_processor):
    records = make_shapes_records(3, seed=1)
    with_answer = make_batches(records, llava_processor, max_length=64, batch_size=3)[0]
    without = make_batches(records, llava_processor, max_length=64, batch_size=3, include_answer=False)[0]
    assert (with_answer["attention_mask"].sum(1) - without["attention_mask"].sum(1)).tolist() == [1, 1, 1]
    assert torch.equal(with_answer["pixel_values"], without["pixel_values"])


def test_truncation_keeps_image_tokens_and_too_short_max_length_fails(llava_processor):
    records = make_shapes_records(2, seed=0)
    batch = make_batches(records, llava_processor, max_length=IMAGE_TOKENS + 3, batch_size=2)[0]
    assert batch["input_ids"].shape[1] == IMAGE_TOKENS + 3
    assert ((batch["input_ids"] == llava_processor.image_token_id).sum(1) == IMAGE_TOKENS).all()
    with pytest.raises(CalibrationError, match=f"max_length must be at least {IMAGE_TOKENS + 1}"):
        make_batches(records, llava_processor, max_length=IMAGE_TOKENS, batch_size=2)


def test_mixed_image_and_text_batch_fails(llava_processor):
    records = [make_shapes_records(1, seed=0)[0], CalibrationRecord(text="what shape is it ?")]
    with pytest.raises(CalibrationError, match="mixes records with and without images"):
        make_batches(records, llava_processor, max_length=64, batch_size=2)
    batches = make_batches(records, llava_processor, max_length=64, batch_size=1)
    assert "pixel_values" in batches[0] and "pixel_values" not in batches[1]
    assert batches[1]["input_ids"].shape == (1, 6)  # <s> + 5 words


def test_text_tokenizer_batches(tokenizer):
    records = make_shapes_records(3, seed=2) + [CalibrationRecord(text="a b c d e f g h", answer=None)]
    batches = make_batches(records, tokenizer, max_length=6, batch_size=4)
    assert len(batches) == 1 and set(batches[0]) == {"input_ids", "attention_mask"}
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    assert ids.shape == (4, 6)  # the long row is truncated to max_length
    lengths = [min(1 + len(r.text.split()) + (r.answer is not None), 6) for r in records]
    assert mask.sum(1).tolist() == lengths
    for row, m, n in zip(ids, mask, lengths):
        assert not m[n:].any() and (row[n:] == tokenizer.pad_token_id).all()
    assert ids[0, 0] == tokenizer.bos_token_id


def test_pixel_batches():
    records = make_shapes_records(5, seed=0)
    batches = make_pixel_batches(records, build_shapes_image_processor(), batch_size=4)
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(4, 3, 32, 32), (1, 3, 32, 32)]
    assert set(batches[0]) == {"pixel_values"}
    with pytest.raises(CalibrationError, match="no image"):
        make_pixel_batches([CalibrationRecord(text="x")], build_shapes_image_processor(), batch_size=1)


# --- the image placeholder ----------------------------------------------------------------------

PLACED = {  # record text -> words before the image tokens
    "<image>\nwhat color is the shape ?": 0,
    "what color is <image> the shape ?": 3,
    "what color is the shape ?": 0,  # no placeholder: one goes in front
}


def _placeholder_file(tmp_path, texts):
    make_shapes_records(1, seed=0)[0].image.save(tmp_path / "shape.png")
    return _write_jsonl(tmp_path / "placed.jsonl", [{"image": "shape.png", "text": t, "answer": "red"} for t in texts])


def _image_span(row, image_id):
    at = (row == image_id).nonzero().flatten().tolist()
    return at[0], len(at)


def test_placeholder_is_used_where_it_stands_and_added_where_missing(tmp_path, llava_processor):
    records = load_records(str(_placeholder_file(tmp_path, list(PLACED))), samples=3, seed=0)
    batch = make_batches(records, llava_processor, max_length=64, batch_size=3)[0]
    word_ids = make_batches([CalibrationRecord(text="what color is the shape ?", answer="red")], llava_processor,
                            max_length=64, batch_size=1)[0]["input_ids"][0]
    for row, mask, before in zip(batch["input_ids"], batch["attention_mask"], PLACED.values()):
        first, count = _image_span(row, llava_processor.image_token_id)
        assert count == IMAGE_TOKENS  # exactly one image's worth, wherever the placeholder was
        assert first == 1 + before  # after <s> and the words written before the placeholder
        words = row[mask.bool()][row[mask.bool()] != llava_processor.image_token_id]
        assert torch.equal(words, word_ids)  # the text around the placeholder is kept, in order


def test_placed_records_quantize_on_the_tiny_llava(tmp_path, llava, llava_processor):
    from qvlm.config import QuantConfig
    from qvlm.driver import quantize

    model, _ = llava
    records = load_records(str(_placeholder_file(tmp_path, list(PLACED) * 2)), samples=6, seed=0)
    batches = make_batches(records, llava_processor, max_length=64, batch_size=3)
    assert all(((b["input_ids"] == llava_processor.image_token_id).sum(1) == IMAGE_TOKENS).all() for b in batches)
    qmodel, result = quantize(model, batches, QuantConfig(method="rtn"))
    assert {u.segment for u in result.units} == {"vision", "projector", "language"}
    with torch.no_grad():
        assert all(torch.isfinite(qmodel(**b).logits).all() for b in batches)


def _refused(records, processor, needle):
    with pytest.raises(CalibrationError) as info:
        make_batches(records, processor, max_length=64, batch_size=len(records))
    assert needle in str(info.value) and "fix:" in str(info.value)
    return str(info.value)


def test_more_placeholders_than_images_is_refused_naming_file_and_line(tmp_path, llava_processor):
    path = _placeholder_file(tmp_path, ["what color is the shape ?", "<image> what <image> color ?"])
    message = _refused(load_records(str(path), samples=2, seed=0), llava_processor,
                       'field "text" holds 2 image placeholders <image> but the record has 1 image')
    assert message.startswith(f"calibration file {path}, line 2: ")
    text_only = _write_jsonl(tmp_path / "text.jsonl", [{"text": "what <image> is it ?"}])
    message = _refused(load_records(str(text_only), samples=1, seed=0), llava_processor,
                       "holds 1 image placeholder <image> but the record has no image")
    assert message.startswith(f"calibration file {text_only}, line 1: ")
    builtin = make_shapes_records(2, seed=0)
    builtin[1] = CalibrationRecord(text="<image> " + builtin[1].text, image=builtin[1].image, answer="<image>")
    assert _refused(builtin, llava_processor, 'field "answer" holds the image placeholder <image>').startswith(
        "calibration record 1: ")


def test_a_text_only_model_keeps_the_placeholder_as_text(tokenizer):
    batch = make_batches([CalibrationRecord(text="<image> <image> what ?")], tokenizer, max_length=16, batch_size=1)[0]
    assert batch["input_ids"].shape == (1, 5)  # <s> + the two placeholders as plain tokens + two words


def test_two_placeholders_through_the_cli_exit_2_naming_file_and_line(tmp_path, tiny_llava_dir):
    from pathlib import Path

    from jobs.cli import app
    from tests.test_bad_input import Case, error_line, runner

    c = Case(tmp_path, Path(tiny_llava_dir))
    make_shapes_records(1, seed=0)[0].image.save(tmp_path / "shape.png")
    cal = c.calibration(['{"image": "shape.png", "text": "what color is the shape ?"}',
                         '{"image": "shape.png", "text": "<image> what color <image> is it ?"}'] * 2)
    line = error_line(runner.invoke(app, ["plan", str(c.write())]), 2)
    assert f"calibration file {cal}, line 2: field \"text\" holds 2 image placeholders <image>" in line
    assert not c.out.exists()
