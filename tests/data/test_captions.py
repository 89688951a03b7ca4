"""Caption generation and the caption tokenizer."""
import numpy as np
import pytest

from research.data import captions as cap


def test_templates_disjoint_and_held_out_words_unknown():
    assert set(cap.TRAIN_TEMPLATES).isdisjoint(cap.HELD_OUT_TEMPLATES)
    tok = cap.CaptionTokenizer.build()
    # Each held-out template has at least one word the training vocabulary lacks.
    for t in cap.HELD_OUT_TEMPLATES:
        ids = tok.encode(cap.fill(t, "dress"))
        assert (ids == tok.unk_id).any(), t
    # Training captions never contain [UNK], whatever the template and attributes.
    for t in cap.TRAIN_TEMPLATES:
        for c in cap.CLASS_PHRASES:
            ids = tok.encode(cap.fill(t, c, ["medium-sized", "mid-tone"]))
            assert not (ids == tok.unk_id).any(), (t, c)


def test_tokenizer_deterministic_roundtrip_and_json():
    a, b = cap.CaptionTokenizer.build(), cap.CaptionTokenizer.build()
    assert a == b and a.vocab[:3] == cap.SPECIALS
    ids = a.encode("A photo of an ankle boot.")
    assert ids.dtype == np.int32 and ids.shape == (a.max_len,)
    assert a.decode(ids) == "a photo of an ankle boot ."
    n = len(cap.words("a photo of an ankle boot."))
    assert ids[n] == a.eos_id and (ids[n + 1:] == a.pad_id).all()
    assert cap.CaptionTokenizer.from_json(a.to_json()) == a
    with pytest.raises(ValueError, match="max_len"):
        cap.CaptionTokenizer.build(max_len=4).encode("a photo of a large bright coat.")


def test_object_phrase_articles():
    assert cap.object_phrase("ankle boot") == "an ankle boot"
    assert cap.object_phrase("sandal", ["small", "dark"]) == "a small dark sandal"
    assert cap.fill("a photo of {obj}.", "coat", ["large"]) == "a photo of a large coat."


def test_attributes_measured_on_the_image():
    img = np.zeros((3, 28, 28), np.uint8)
    img[0, :5, :5] = 60          # small, dark
    img[1, :, :20] = 200         # large, bright
    img[2, :, :12] = 150         # medium-sized (12/28 = 0.43), mid-tone
    size, tone = cap.image_attributes(img)
    assert [cap.SIZE_WORDS[i] for i in size] == ["small", "large", "medium-sized"]
    assert [cap.TONE_WORDS[i] for i in tone] == ["dark", "bright", "mid-tone"]


def test_random_captions_seeded_and_name_the_class():
    labels = np.arange(10)
    size, tone = np.zeros(10, int), np.full(10, 2)
    a = cap.random_captions(labels, size, tone, np.random.default_rng(0))
    b = cap.random_captions(labels, size, tone, np.random.default_rng(0))
    assert a == b
    for text, c in zip(a, cap.CLASS_PHRASES):
        assert c in text
        assert any(text == cap.fill(t, c, adj) for t in cap.TRAIN_TEMPLATES
                   for adj in ([], ["small"], ["bright"], ["small", "bright"], ["bright", "small"]))


def test_word_dropout_keeps_class_words_and_specials():
    tok = cap.CaptionTokenizer.build()
    ids = tok.encode_batch(["a photo of a small coat."] * 50)
    keep = tok.encode("coat")[:1]
    out = cap.word_dropout(ids, 0.5, np.random.default_rng(0), keep=keep)
    assert (out[ids == keep[0]] == keep[0]).all()
    assert (out[ids <= tok.unk_id] == ids[ids <= tok.unk_id]).all()
    dropped = (out != ids).mean() / (ids > tok.unk_id).mean()
    assert 0.3 < dropped < 0.6 and (out[out != ids] == tok.unk_id).all()


@pytest.mark.parametrize("names,match", [((), "empty"), (("coat", " "), "empty"),
                                         (("coat", "Coat"), "duplicates")])
def test_class_list_errors(names, match):
    with pytest.raises(ValueError, match=match):
        cap.check_class_names(names)
