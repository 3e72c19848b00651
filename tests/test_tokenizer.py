from mmjax.data import tokenizer


def test_round_trip_and_padding():
  ids, mask = tokenizer.encode("what is 3 plus 4? ü", 32)
  assert ids.dtype.name == "int32" and ids.shape == (32,)
  assert ids[0] == tokenizer.BOS_ID and mask.sum() == len("what is 3 plus 4? ü".encode()) + 2
  assert tokenizer.decode(ids) == "what is 3 plus 4? ü"
  assert ids.max() < tokenizer.VOCAB_SIZE


def test_truncation_and_batch():
  ids, mask = tokenizer.encode_batch(["ab", "a" * 100], 8)
  assert ids.shape == (2, 8) and mask[1].all() and mask[0].sum() == 4
