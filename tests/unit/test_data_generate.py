import pytest
import torch

from distillgate.data.generate import build_example, encode_prompt, end_of_turn_id, generate_responses
from distillgate.data.prompts import builtin_prompts, make_record
from distillgate.errors import ConfigError
from distillgate.targets import prediction_positions, prediction_targets

pytestmark = pytest.mark.usefixtures("one_thread")




def test_loss_mask_alignment_on_hand_built_chat(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = make_record([{"role": "user", "content": "Please summarise the report."}], "finance_risk", "test")
    prompt_ids = encode_prompt(tok, rec.messages)
    assert tok.decode(prompt_ids) == "<|im_start|>user\nPlease summarise the report.<|im_end|>\n<|im_start|>assistant\n"
    resp = tok("Revenue grew by 12 percent.", add_special_tokens=False)["input_ids"]
    eot = end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(eot) == "<|im_end|>"
    ex = build_example(rec, 0, prompt_ids, resp, True, eot, "Revenue grew by 12 percent.")
    assert ex.input_ids == prompt_ids + resp + [eot]
    assert ex.loss_mask == [0] * len(prompt_ids) + [1] * (len(resp) + 1)
    assert ex.id == f"{rec.id}/s0" and ex.n_targets == len(resp) + 1
    # the prediction positions predict exactly the response + end-of-turn, from the token before each
    batch = {"input_ids": torch.tensor([ex.input_ids]), "loss_mask": torch.tensor([ex.loss_mask])}
    b, t = prediction_positions(batch)
    assert t.tolist() == list(range(len(prompt_ids) - 1, len(ex.input_ids) - 1))
    assert tok.decode(prediction_targets(batch).tolist()) == "Revenue grew by 12 percent.<|im_end|>"
    # an answer cut by max_new_tokens gets no end-of-turn target
    cut = build_example(rec, 1, prompt_ids, resp, False, eot, "")
    assert cut.input_ids == prompt_ids + resp and sum(cut.loss_mask) == len(resp)


def test_greedy_generation_is_deterministic_and_batch_independent(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory(seed=0)
    prompts = builtin_prompts(4, seed=2)
    a = generate_responses(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3, progress=False)
    b = generate_responses(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=1, progress=False)
    assert [e.input_ids for e in a] == [e.input_ids for e in b]
    assert [e.prompt_id for e in a] == [p.id for p in prompts]  # prompt order kept despite length sorting
    for e, p in zip(a, prompts):
        n_prompt = len(encode_prompt(tiny_tokenizer, p.messages))
        assert e.loss_mask == [0] * n_prompt + [1] * (len(e.input_ids) - n_prompt)
        assert 1 <= e.n_targets <= 7 and e.domain == p.domain and e.complexity == p.complexity
    # left-padded batched greedy equals one-by-one HF generate without padding
    ids = torch.tensor([encode_prompt(tiny_tokenizer, prompts[0].messages)])
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         eos_token_id=end_of_turn_id(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id)
    assert a[0].input_ids[: ref.shape[1]] == ref[0].tolist()[: len(a[0].input_ids)]


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory(seed=0)
    prompts = builtin_prompts(3, seed=0)
    kw = dict(max_new_tokens=8, samples_per_prompt=2, temperature=1.5, batch_size=2, progress=False)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = generate_responses(model, tiny_tokenizer, prompts, seed=5, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = generate_responses(model, tiny_tokenizer, prompts, seed=5, **kw)
    c = generate_responses(model, tiny_tokenizer, prompts, seed=6, **kw)
    assert len(a) == 6 and [e.sample_idx for e in a] == [0, 1] * 3
    assert [e.input_ids for e in a] == [e.input_ids for e in b]
    assert [e.input_ids for e in a] != [e.input_ids for e in c]
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        generate_responses(model, tiny_tokenizer, prompts, max_new_tokens=4, samples_per_prompt=2, progress=False)


def test_generation_stops_at_end_of_turn(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory(seed=0)
    eot = end_of_turn_id(tiny_tokenizer)
    head = torch.nn.Linear(32, len(tiny_tokenizer), bias=True)  # a teacher that always ends its turn
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[eot] = 10.0
    model.lm_head = head
    ex = generate_responses(model, tiny_tokenizer, builtin_prompts(3), max_new_tokens=5, progress=False)
    for e in ex:
        assert e.finished and e.response == "" and e.input_ids[-1] == eot
        assert e.loss_mask[-1] == 1 and e.n_targets == 1
