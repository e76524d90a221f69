"""colaft.formats, the one reader of data files (colaft train --data and the service's uploads):
each format from JSONL and CSV, chat weights and text parts, line-numbered errors, renames
(through colaft.data), image folders and files decoded with Pillow, an unreadable image named."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colaft import data, formats
from colaft.formats import DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def lines(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def user(text):
    return {"role": "user", "content": text}


def bot(text, **extra):
    return {"role": "assistant", "content": text, **extra}


# ---------------------------------------------------------------- files and formats
def test_the_kind_of_file_is_its_extension_or_its_first_character():
    assert formats.kind_of("a.CSV", b"{") == "csv" and formats.kind_of("a.jsonl", b"x,y") == "jsonl"
    assert formats.kind_of("upload", b'\n {"text": 1}') == "jsonl"
    assert formats.kind_of("", b"text,label\n") == "csv"


@pytest.mark.parametrize("name, content, fmt", [
    ("p.jsonl", lines({"prompt": "p", "completion": "c"}), "prompt"),
    ("p.csv", b"prompt,completion\np,c\n", "prompt"),
    ("r.csv", b"text,label\ngood,pos\n", "classification"),
    ("i.csv", b"image,label\na.png,cat\n", "image"),
    ("c.jsonl", lines({"messages": [user("hi"), bot("hello")]}), "chat"),
])
def test_each_format_is_recognised_in_either_kind_of_file(name, content, fmt):
    assert formats.parse(content, name)[0] == fmt


def test_csv_cells_are_text_numbers_or_missing():
    fmt, records, labels = formats.parse(b"text,label,note\n12,1,\"two\nlines\"\nfine,0,\n", "r.csv")
    assert (fmt, labels) == ("classification", [0, 1])
    assert records[0] == {"text": "12", "label": 1, "note": "two\nlines"}  # a number as text is text
    assert math.isnan(records[1]["note"])


def test_chat_turns_weights_and_text_parts():
    parts = [{"type": "text", "text": "what is "}, {"type": "text", "text": "ai"}]
    messages = [{"role": "system", "content": "be brief"}, user(parts), bot("no", weight=0), user("again"),
                bot("ai is thinking machines"), user("thanks"), bot("welcome", weight=0)]
    fmt, records, _ = formats.parse(lines({"messages": messages, "topic": "ai"}), "c.jsonl")
    checked = records[0]["messages"]
    assert checked[1] == user("what is ai")  # text parts joined
    assert [m.get("weight") for m in checked] == [None, None, 0, None, 1, None, 0]  # every assistant turn weighed
    record = formats.task_records(fmt, records)[0]
    # the question is everything before the last learnt answer; nothing learnt comes later
    assert record == {"question": checked[:4], "answer": "ai is thinking machines", "topic": "ai"}


def test_a_chat_of_one_answer_is_a_question_and_its_answer():
    chat = {"messages": [{"role": "system", "content": "be brief"}, user("hi"), bot("hello")]}
    assert formats.task_records(*formats.parse(lines(chat))[:2]) == [
        {"question": [{"role": "system", "content": "be brief"}, user("hi")], "answer": "hello"}]


def test_tool_calls_tool_turns_and_tools_as_openais_fine_tuning_data():
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    chat = {"messages": [user("weather?"), bot(None, tool_calls=[call]),
                         {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]},
                         bot("sunny"), user("and now?"),
                         {"role": "assistant", "function_call": {"name": "weather", "arguments": "{}"}, "weight": 1},
                         {"role": "function", "name": "weather", "content": "rain"}, bot("rain", weight=0)],
            "functions": [{"name": "weather"}]}
    fmt, records, _ = formats.parse(lines(chat), "t.jsonl")
    checked = records[0]["messages"]
    assert checked[1] == {"role": "assistant", "content": "", "tool_calls": [call], "weight": 1}
    assert checked[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    assert checked[6] == {"role": "function", "content": "rain", "name": "weather"}
    assert records[0]["tools"] == [{"type": "function", "function": {"name": "weather"}}]  # functions -> tools
    record = formats.task_records(fmt, records)[0]
    # the last learnt turn calls a function: the answer is the whole message
    assert record["answer"] == {"role": "assistant", "content": "",
                                "function_call": {"name": "weather", "arguments": "{}"}, "weight": 1}
    assert record["question"] == checked[:5] and record["tools"] == records[0]["tools"]


def test_labels_become_their_index_in_sorted_order():
    fmt, records, labels = formats.parse(b"text,label\na,pos\nb,neg\n", "r.csv")
    assert labels == ["neg", "pos"]
    assert formats.task_records(fmt, records, labels) == [{"text": "a", "label": 1}, {"text": "b", "label": 0}]


@pytest.mark.parametrize("name, content, message", [
    ("c.jsonl", lines({"messages": [user("hi"), bot("a", weight=0)]}),
     "line 1: the last message to learn must be an assistant turn, but every assistant turn has weight 0"),
    ("c.jsonl", lines({"messages": [user("hi"), bot("a")]}, {"messages": [user("hi"), bot("a", weight=2)]}),
     "line 2: message 1 \"weight\" must be 0 or 1"),
    ("c.jsonl", lines({"messages": [{"role": "user", "content": "hi", "weight": 1}, bot("a")]}),
     "line 1: message 0 \"weight\": only assistant turns have one"),
    ("c.jsonl", lines({"messages": [user([{"type": "image_url", "image_url": "x"}]), bot("a")]}),
     "line 1: message 0 \"content\" parts must be"),
    ("c.jsonl", lines({"messages": [bot("a"), user("hi"), bot("b")]}), "line 1: no user message before the first"),
    ("c.jsonl", lines({"messages": [user("hi"), bot(None)]}), "line 1: message 1 \"content\" must be text"),
    ("c.jsonl", lines({"messages": [user("hi"), bot(None, tool_calls=[{"type": "function", "function": {}}])]}),
     "line 1: message 1 tool call 0 \"name\" must be non-empty text"),
    ("c.jsonl", lines({"messages": [user("hi"), bot("a", tool_calls=[{"type": "function", "function": {
        "name": "f", "arguments": {"x": 1}}}])]}), "line 1: message 1 tool call 0 \"arguments\" must be text"),
    ("c.jsonl", lines({"messages": [user("hi"), {"role": "function", "content": "x"}, bot("a")]}),
     "line 1: message 1 \"name\" must be non-empty text"),
    ("c.jsonl", lines({"messages": [user("hi"), bot("a")], "tools": {"f": 1}}), "line 1: \"tools\" must be a list"),
    ("r.csv", b"text,label\ngood,pos\n\n\"a\nb\",neg\nbad\n", "line 6: 1 cells, but the header has 2 columns"),
    ("r.csv", b"text,label\ngood,pos\n,neg\n", "line 3: \"text\" must be non-empty text"),
    ("r.csv", b"text,text\na,b\n", "line 1: the header needs distinct"),
    ("r.jsonl", lines({"text": "a", "label": 1}) + b"\n{\"text\": }\n", "line 3: not valid JSON"),
    ("r.jsonl", lines({"text": "a", "label": True}), "line 1: \"label\" must be text or an integer"),
    ("p.jsonl", lines({"question": "q", "answer": "a"}), "line 1: a record needs"),  # the service's API names
    ("i.jsonl", lines({"image": "a.png", "label": "x"}), "line 1: a record needs"),  # no image task served
])
def test_errors_are_one_line_naming_the_line_and_the_field(name, content, message):
    formats_ = ("chat", "prompt", "classification") if "i.jsonl" in name else formats.FORMATS
    with pytest.raises(DataError, match="^" + message.replace("(", r"\(")) as e:
        formats.parse(content, name, formats_)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- through colaft.data (the CLI)
def test_columns_renamed_then_read_as_a_format(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("q,a,who\nhi,hello,ann\nbye,,bob\n2+2,4,cy\n")
    records = data.load(str(path), {"question": "q", "answer": "a"}, ("question", "answer"))
    assert records == [{"question": "hi", "answer": "hello", "who": "ann"},  # the empty answer's row is skipped
                       {"question": "2+2", "answer": "4", "who": "cy"}]


def test_a_file_read_for_another_task_says_what_it_holds():
    with pytest.raises(ValueError, match=r"holds classification records \(for task sc\) and has no field "
                                         r"'question'; its fields are text, label"):
        data.load(str(EXAMPLES / "reviews.csv"), required=("question", "answer"))


def test_a_broken_line_is_named_with_the_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [user("hi"), bot("a")]}) + "\n"
                    + json.dumps({"messages": [user("hi"), {"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl': line 2: message 1 must be \{\"role\": one of"):
        data.load(str(path), required=("question", "answer"))


def test_every_example_file_reads():
    chat = data.load(str(EXAMPLES / "chat.jsonl"), required=("question", "answer"))
    assert len(chat) == 8 and any(m.get("weight") == 0 for r in chat for m in r["question"])
    assert len(data.load(str(EXAMPLES / "prompt.jsonl"), required=("question", "answer"))) == 8
    csv, jsonl = (data.load(str(EXAMPLES / f), required=("text", "label")) for f in ("reviews.csv", "reviews.jsonl"))
    assert csv == jsonl and {r["label"] for r in csv} == {"positive", "negative"}
    folder = data.load(str(EXAMPLES / "images"), required=("image", "label"))
    listed = data.load(str(EXAMPLES / "images.csv"), {"image": "file", "label": "class"}, ("image", "label"))
    assert [(r["image"].resolve(), r["label"]) for r in listed] == [(r["image"].resolve(), r["label"]) for r in folder]
    assert len(folder) == 8 and folder[0]["label"] == "horizontal"


# ---------------------------------------------------------------- images
def write_png(path: Path, mode: str, size: tuple[int, int], value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def test_an_image_folder_has_one_subfolder_per_class(tmp_path):
    write_png(tmp_path / "cat" / "a.png", "L", (4, 4), 0)
    write_png(tmp_path / "dog" / "deep" / "b.PNG", "RGB", (4, 4), (0, 0, 0))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "loose.png").write_bytes(b"")  # outside any class folder
    assert formats.image_files(tmp_path) == [{"image": tmp_path / "cat" / "a.png", "label": "cat"},
                                             {"image": tmp_path / "dog" / "deep" / "b.PNG", "label": "dog"}]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image in a class subfolder"):
        formats.image_files(tmp_path / "empty")


def test_images_are_decoded_to_the_channels_and_size_asked(tmp_path):
    grey = write_png(tmp_path / "grey.png", "L", (6, 4), 255)
    colour = write_png(tmp_path / "colour.png", "RGB", (3, 2), (255, 0, 51))
    assert formats.image_info(grey) == (1, (6, 4)) and formats.image_info(colour) == (3, (3, 2))
    pixels = formats.load_image(grey)
    assert pixels.shape == (1, 4, 6) and pixels.dtype == np.float32 and np.all(pixels == 1.0)
    resized = formats.load_image(colour, channels=3, size=(6, 4))  # size is (width, height)
    assert resized.shape == (3, 4, 6)
    np.testing.assert_allclose(resized[:, 0, 0], [1.0, 0.0, 0.2], atol=1e-6)  # scaled to [0, 1]
    assert formats.load_image(grey, channels=3).shape == (3, 4, 6)
    assert formats.load_image(colour, channels=1).shape == (1, 2, 3)


def test_an_unreadable_image_is_named(tmp_path):
    broken = tmp_path / "cat" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG not really")
    for read in (formats.image_info, formats.load_image):
        with pytest.raises(DataError, match=r"^image '.*broken.png': cannot read it \(") as e:
            read(broken)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"image '.*absent.png': cannot read it"):
        formats.load_image(tmp_path / "absent.png")


def test_labels_of_one_kind_through_colaft_data(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(lines({"text": "a", "label": 1}, {"text": "b", "label": "pos"}).decode())
    with pytest.raises(ValueError, match="r.jsonl': labels mix text and integers"):
        data.load(str(path), required=("text", "label"))
