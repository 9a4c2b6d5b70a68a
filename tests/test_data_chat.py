"""TRL's conversational data formats: message lists rendered with the plain or a checkpoint's chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data.chat import PLAIN, ChatError, hf_renderer, renderer_for, split_reply
from rlhf.data.examples import PreferencePair, Rating, SFTExample
from rlhf.data.jsonl import read_preference_pairs, read_ratings, read_sft_examples, split_transcript_pair
from rlhf.errors import DataError

# the tiny template: every message tagged with its role, the generation prompt "<|assistant|>"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_tokenizer(template: str = TEMPLATE):
    """A transformers fast tokenizer with `template`: only its chat template matters here."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "</s>": 1}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = template
    return tok


CHAT = [
    msg("system", "Be brief."),
    msg("user", "Hi"),
    msg("assistant", "Hello!"),
    msg("user", "Name a fruit."),
    msg("assistant", "An apple."),
]


# ------------------------------------------------------------------------------ plain template


def test_sft_prompt_completion_strings(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Q?", "completion": " A."}, {"prompt": "", "response": "r"}])
    assert read_sft_examples(path) == [SFTExample("Q?", " A."), SFTExample("", "r")]


def test_sft_messages_train_each_assistant_turn_on_its_own_prompt(tmp_path):
    # a trailing user turn has no answer to train on: it is ignored
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": CHAT + [msg("user", "Thanks!")]}])
    stats: dict = {}
    got = read_sft_examples(path, stats=stats)
    assert got == [
        SFTExample("Be brief.\n\nHuman: Hi\n\nAssistant:", " Hello!"),
        SFTExample("Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:", " An apple."),
    ]
    assert stats == {"read": 1, "skipped": 0}  # rows, not examples
    # prompt + response is the transcript up to that turn, as split_transcript_pair cuts one
    assert got[1].prompt + got[1].response == "Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: An apple."


def test_sft_conversational_prompt_completion(tmp_path):
    row = {"prompt": [msg("user", "Hi")], "completion": [msg("assistant", "Hello!")]}
    assert read_sft_examples(write_jsonl(tmp_path / "s.jsonl", [row])) == [SFTExample("\n\nHuman: Hi\n\nAssistant:", " Hello!")]


def test_explicit_conversational_pair(tmp_path):
    row = {"prompt": CHAT[:4], "chosen": [msg("assistant", "An apple.")], "rejected": [msg("assistant", "A rock.")]}
    prompt = "Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:"
    assert read_preference_pairs(write_jsonl(tmp_path / "p.jsonl", [row])) == [PreferencePair(prompt, " An apple.", " A rock.")]


def test_implicit_prompt_conversational_pair_matches_the_transcript_split(tmp_path):
    chosen, rejected = CHAT[1:], CHAT[1:4] + [msg("assistant", "A rock.")]
    pair = read_preference_pairs(write_jsonl(tmp_path / "p.jsonl", [{"chosen": chosen, "rejected": rejected}]))[0]
    assert pair == PreferencePair("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:", " An apple.", " A rock.")
    # the same conversations written as hh-rlhf transcripts split to the same pair
    text = lambda ms: "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in ms)  # noqa: E731
    assert split_transcript_pair(text(chosen), text(rejected)) == pair


def test_implicit_pair_replies_may_be_several_assistant_messages(tmp_path):
    row = {"chosen": [msg("user", "Hi"), msg("assistant", "A"), msg("assistant", "B")], "rejected": [msg("user", "Hi"), msg("assistant", "C")]}
    got = read_preference_pairs(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert got == [PreferencePair("\n\nHuman: Hi\n\nAssistant:", " A\n\nAssistant: B", " C")]


def test_conversational_ratings_with_trl_label(tmp_path):
    rows = [
        {"prompt": [msg("user", "Hi")], "completion": [msg("assistant", "Hello!")], "label": True},
        {"prompt": "Q", "completion": " no", "label": False},
    ]
    got = read_ratings(write_jsonl(tmp_path / "r.jsonl", rows))
    assert got == [Rating("\n\nHuman: Hi\n\nAssistant:", " Hello!", 1, 2), Rating("Q", " no", 0, 2)]


def test_string_rows_and_conversational_rows_mix_in_one_file(tmp_path):
    rows = [{"prompt": "P", "chosen": "c", "rejected": "r"}, {"chosen": CHAT[1:3], "rejected": CHAT[1:2] + [msg("assistant", "Yo")]}]
    got = read_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert got == [PreferencePair("P", "c", "r"), PreferencePair("\n\nHuman: Hi\n\nAssistant:", " Hello!", " Yo")]


USER_HI = msg("user", "Hi")


@pytest.mark.parametrize(
    "reader, row, what",
    [
        (read_sft_examples, {"messages": [msg("tool", "x"), msg("assistant", "y")]}, "messages[0] has role 'tool'; expected one of system, user, assistant"),
        (read_sft_examples, {"messages": [USER_HI, {"role": "assistant", "content": ["x"]}]}, "messages[1] content must be a string, got a JSON array"),
        (read_sft_examples, {"messages": [USER_HI, "Hello"]}, "messages[1] is a JSON string, expected a"),
        (read_sft_examples, {"messages": [msg("system", "s"), USER_HI]}, "'messages' has no assistant message to train on"),
        (read_sft_examples, {"messages": []}, "'messages' is an empty list of messages"),
        (read_sft_examples, {"messages": "Hi"}, "'messages' must be a list of messages, got a JSON string"),
        (read_sft_examples, {"messages": [USER_HI, msg("assistant", " ")]}, "messages[1] (assistant) is empty"),
        (read_sft_examples, {"messages": [USER_HI, msg("system", "s"), msg("assistant", "a")]}, "the plain template takes a system message only as the first"),
        (read_sft_examples, {"prompt": "Hi", "completion": [msg("assistant", "a")]}, "'completion' is a message list but 'prompt' is not"),
        (read_sft_examples, {"prompt": [USER_HI], "completion": [USER_HI]}, "completion[0] is a user message; 'completion' may hold assistant messages only"),
        (read_sft_examples, {"prompt": [USER_HI]}, "missing key 'response'"),
        (read_preference_pairs, {"prompt": [USER_HI], "chosen": [msg("assistant", "a")], "rejected": "b"}, "'prompt' is a message list but 'rejected' is not"),
        (read_preference_pairs, {"prompt": [USER_HI], "chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "a")]}, "chosen and rejected are identical"),
        (read_preference_pairs, {"chosen": [USER_HI, msg("assistant", "a")], "rejected": [USER_HI, msg("assistant", "a")]}, "chosen and rejected are identical"),
        (read_preference_pairs, {"chosen": [USER_HI, msg("assistant", "a")], "rejected": [USER_HI]}, "rejected has no message after the 1 it shares"),
        (read_ratings, {"prompt": [USER_HI], "completion": [msg("assistant", "a")], "label": "yes"}, "'label' must be true or false"),
    ],
)
def test_bad_conversational_rows_name_file_and_line(tmp_path, reader, row, what):
    good = {read_sft_examples: {"prompt": "p", "response": "r"}, read_ratings: {"prompt": "p", "response": "r", "rating": True}}
    path = write_jsonl(tmp_path / "d.jsonl", [good.get(reader, {"prompt": "p", "chosen": "c", "rejected": "r"}), row])
    with pytest.raises(DataError) as err:
        reader(path)
    assert str(err.value).startswith(f"{path}:2: ") and what in str(err.value) and "\n" not in str(err.value)
    stats: dict = {}
    assert len(reader(path, skip_bad_rows=True, stats=stats)) == 1 and stats["skipped"] == 1


def test_pair_differing_in_a_user_turn_is_a_bad_row(tmp_path):
    # two questions, not two answers to one conversation
    chosen = [msg("user", "Hi"), msg("assistant", "Hi."), msg("user", "Is the sea salty?"), msg("assistant", "Yes.")]
    rejected = [msg("user", "Hi"), msg("assistant", "Hi."), msg("user", "Is the sea sweet?"), msg("assistant", "Yes.")]
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": chosen, "rejected": rejected}])
    with pytest.raises(DataError, match=r"p.jsonl:1: the conversations differ before their final assistant message\(s\) \(chosen\[2\] is a user message\)"):
        read_preference_pairs(path)


# --------------------------------------------------------------------------------- chat template


def test_chat_template_renders_prompts_and_responses(tmp_path):
    chat = hf_renderer(hf_tokenizer())
    sft = write_jsonl(tmp_path / "s.jsonl", [{"messages": CHAT}])
    assert read_sft_examples(sft, chat=chat) == [
        SFTExample("<|system|>Be brief.\n<|user|>Hi\n<|assistant|>", "Hello!\n"),
        SFTExample("<|system|>Be brief.\n<|user|>Hi\n<|assistant|>Hello!\n<|user|>Name a fruit.\n<|assistant|>", "An apple.\n"),
    ]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"chosen": CHAT[1:3], "rejected": CHAT[1:2] + [msg("assistant", "Yo")]}])
    assert read_preference_pairs(pairs, chat=chat) == [PreferencePair("<|user|>Hi\n<|assistant|>", "Hello!\n", "Yo\n")]
    # string rows are never templated
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "p", "response": "r"}])
    assert read_sft_examples(plain, chat=chat) == [SFTExample("p", "r")]


def test_chat_template_eos_text_is_cut_from_the_response():
    # the stages append the EOS id themselves: the template's own EOS text (and what follows it) goes
    tok = hf_tokenizer("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    assert split_reply(hf_renderer(tok), [msg("user", "Hi")], [msg("assistant", "Hello!")]) == ("[user] Hi\n[assistant] ", "Hello!")


def test_a_template_that_rewrites_the_prompt_is_a_clear_bad_row(tmp_path):
    # the generation prompt differs from how the template opens an assistant turn
    tok = hf_tokenizer("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}")
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": [USER_HI, msg("assistant", "Hello!")]}])
    with pytest.raises(DataError, match=r"s.jsonl:1: the chat template does not render the prompt \(with its generation prompt\) as a prefix"):
        read_sft_examples(path, chat=hf_renderer(tok))


def test_a_template_raising_is_a_bad_row(tmp_path):
    tok = hf_tokenizer("{{ raise_exception('Conversation roles must alternate user/assistant') }}")
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": [USER_HI, msg("assistant", "Hello!")]}])
    with pytest.raises(DataError, match=r"s.jsonl:1: the chat template failed: Conversation roles must alternate"):
        read_sft_examples(path, chat=hf_renderer(tok))
    with pytest.raises(ChatError, match="the chat template failed"):
        split_reply(hf_renderer(tok), [], [msg("assistant", "a")])


def test_renderer_for_picks_the_tokenizers_template():
    class HFLike:  # the hf backend's HFTokenizer: a chat template and a transformers twin
        chat_template = TEMPLATE

        def to_transformers(self):
            return hf_tokenizer()

    class NoTemplate(HFLike):
        chat_template = None

    assert renderer_for(HFLike()).render([USER_HI], True) == "<|user|>Hi\n<|assistant|>"
    assert renderer_for(NoTemplate()) is PLAIN
    assert renderer_for(object()) is PLAIN  # the built-in and BPE tokenizers


def test_text_task_reads_conversational_rows(tmp_path):
    from rlhf.tasks.text import _parse_any

    assert _parse_any({"messages": CHAT[1:]}) == (
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:",
        ["\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:", " An apple."],
    )
    # a pair a stage would refuse still lends its text to the tokenizer
    assert _parse_any({"chosen": [USER_HI], "rejected": [USER_HI, msg("user", "Yo")]}) == ("", ["Hi", "Hi", "Yo"])


def test_sft_stage_trains_on_a_messages_file(tmp_path):
    """End to end on the tiny model: task=text and the SFT stage both read a conversational file."""
    from hydra import compose, initialize_config_dir

    from conftest import TINY
    from rlhf.config import CONF_DIR, register_configs
    from rlhf.orchestrator import run_recipe

    topics = ["bread", "the moon", "chess", "tea", "rivers", "owls"]
    rows = [{"messages": [msg("user", f"Tell me about {t}."), msg("assistant", f"{t} is nice."), msg("user", "More?"), msg("assistant", "No.")]} for t in topics]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "recipe=sft", *TINY, "task.name=text", f"task.data={data}", "task.vocab_size=300", "task.num_eval_prompts=1",
            f"stages.sft.data={data}", "stages.sft.max_steps=2", "stages.sft.batch_size=2",
            "model.dim=32", "model.depth=1", "model.heads=2", "eval.max_new_tokens=4", "eval.samples_per_prompt=0",
        ])
    metrics = run_recipe(cfg, tmp_path / "run")["sft"]
    # the task and the stage read the conversations; the stage trained and evaluated the held-out prompt
    assert metrics["data/truncated_rows"] == 0 and "eval/response_length" in metrics
