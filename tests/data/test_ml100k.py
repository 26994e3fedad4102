"""The MovieLens-100K + TMDB loader: the real folder's counts and rules, and one DataError per bad input."""

import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from image_bytes import jpeg_claiming, png
from PIL import Image

from common.errors import DataError, MMRankError
from mmrank.cli import main
from trainer.data.ml100k import ML100KConfig, build_ml100k, read_source
from trainer.data.schema import SPLITS, load_dataset

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml100k_tmdb_posters"
MISSING_POSTERS = [
    330,
    387,
    563,
    767,
    868,
    907,
    1026,
    1331,
    1340,
    1346,
    1359,
    1420,
    1431,
    1498,
    1516,
    1536,
    1568,
    1586,
    1667,
]
real_data = pytest.mark.skipif(not REAL.is_dir(), reason=f"real data not at {REAL}")

GENRES = ["unknown", "Action", "Comedy", "Drama"]
OCCUPATIONS = ["artist", "engineer", "student"]
# movie_id|title|release|video|url|genre flags; movie 4 has no release date, movie 6 no poster.
TINY_ITEMS = [
    "1|Alpha (1995)|01-Jan-1995||http://x|0|1|0|0",
    "2|Beta (1981)|15-Mar-1981||http://x|0|0|1|1",
    "3|Caf\u00e9 Gamma (1972)|01-Jan-1972||http://x|0|0|0|1",
    "4|unknown||||1|0|0|0",
    "5|Delta (1996)|02-Feb-1996||http://x|0|1|1|0",
    "6|Epsilon (1997)|01-Jan-1997||http://x|0|0|0|1",
]
TINY_USERS = ["1|24|M|engineer|11111", "2|53|F|artist|22222", "3|17|M|student|33333", "4|40|F|pilot|44444"]


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _tiny_ratings() -> list[str]:
    """Every user rates every movie except where (user + movie) % 4 == 0; ratings cycle 1..5, one day apart."""
    rows = []
    for k, (u, i) in enumerate((u, i) for u in range(1, 5) for i in range(1, 7) if (u + i) % 4):
        rows.append(f"{u}\t{i}\t{(u * i + k) % 5 + 1}\t{800_000_000 + k * 86_400 + u * 60}")
    return rows


def write_tiny_source(root: Path) -> Path:
    """A six-movie, four-user folder in the layout of ml100k_tmdb_posters."""
    ml, tmdb, posters = root / "ml-100k", root / "tmdb", root / "posters"
    for d in (ml, tmdb, posters):
        d.mkdir(parents=True)
    (ml / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n")
    (ml / "u.occupation").write_text("\n".join(OCCUPATIONS) + "\n")
    (ml / "u.item").write_bytes(("\n".join(TINY_ITEMS) + "\n").encode("latin-1"))
    (ml / "u.user").write_text("\n".join(TINY_USERS) + "\n")
    (ml / "u.data").write_text("\n".join(_tiny_ratings()) + "\n")
    (tmdb / "items_tmdb.csv").write_text(
        "movie_id,title,overview,year\n"
        '1,Alpha,"A plot, with a comma.",1995\n'
        "2,Beta,First match wins.,1981\n"
        "2,Beta,Second match loses.,1981\n"
        "3,Gamma,,1972\n"
        "5,Delta,Delta plot.,1996\n"
    )
    for movie in range(1, 6):
        (posters / f"{movie}.jpg").write_bytes(_jpeg(movie))
    return root


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return write_tiny_source(tmp_path_factory.mktemp("tiny") / "src")


@pytest.fixture(scope="module")
def tiny(tiny_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_out") / "ds"
    build_ml100k(tiny_src, out, ML100KConfig(valid_frac=0.2, test_frac=0.2))
    return load_dataset(out)


@pytest.fixture(scope="module")
def real_source():
    return read_source(REAL)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml100k") / "ds"
    assert main(["data", "ml100k", "--src", str(REAL), "--out", str(out)]) == 0
    return load_dataset(out)


@real_data
def test_raw_read_has_the_documented_counts(real_source):
    assert len(real_source.users) == 943
    assert len(real_source.items) == 1682
    assert len(real_source.ratings) == 100_000
    missing = real_source.items.loc[real_source.items["image"].isna(), "movie_id"].tolist()
    assert missing == MISSING_POSTERS
    assert (real_source.items["overview"] != "").sum() == 1664


@real_data
def test_canonical_counts_follow_the_label_rule(real):
    raw = pd.read_csv(REAL / "ml-100k" / "u.data", sep="\t", header=None, names=["u", "i", "r", "t"])
    m, ev = real.manifest, real.events
    assert (m.counts["items"], m.counts["users"], m.counts["ratings"]) == (1682, 943, 100_000)
    assert len(real.items) == 1682 and len(real.users) == 943
    assert len(ev) == m.counts["events"] == int((raw["r"] != 3).sum())
    assert int(ev["label"].sum()) == m.counts["positives"] == int((raw["r"] >= 4).sum())
    assert m.notes["missing_posters"]["count"] == 19 and int(real.items["image"].isna().sum()) == 19
    assert m.label_rule == "rating >= 4 -> 1, rating <= 2 -> 0, rating 3 dropped"
    kept = raw[raw["r"] != 3].assign(split=0)
    kept.loc[kept["t"] >= m.splits["valid_start_ts"], "split"] = 1
    kept.loc[kept["t"] >= m.splits["test_start_ts"], "split"] = 2
    seen = set(kept.loc[kept["split"] == 0, "i"])
    test = kept[kept["split"] == 2]
    assert m.counts["cold_test_events"] == int((~test["i"].isin(seen)).sum()) > 0
    for name, code in SPLITS.items():
        assert m.counts[name] == int((kept["split"] == code).sum()) == int((ev["split"] == code).sum())
        assert m.counts[f"{name}_positives"] == int((kept.loc[kept["split"] == code, "r"] >= 4).sum())
        assert abs(m.counts[name] / len(ev) - {"train": 0.8, "valid": 0.1, "test": 0.1}[name]) < 0.01


@real_data
def test_splits_are_ordered_in_time(real):
    ev, s = real.events, real.manifest.splits
    assert ev.loc[ev["split"] == 0, "ts"].max() < s["valid_start_ts"] <= ev.loc[ev["split"] == 1, "ts"].min()
    assert ev.loc[ev["split"] == 1, "ts"].max() < s["test_start_ts"] <= ev.loc[ev["split"] == 2, "ts"].min()


@real_data
def test_items_carry_text_image_and_categoricals(real):
    items = real.items.set_index("item_id")
    toy = items.loc[1]
    assert toy["title"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert toy["overview"].startswith("Led by Woody, Andy's toys live happily")
    assert toy["created_at"] == 788_918_400  # 1995-01-01 00:00 UTC
    assert toy["genre"] == real.manifest.notes["genre_ids"]["Animation"]
    with Image.open(io.BytesIO(toy["image"])) as im:
        assert im.format == "JPEG" and im.size[0] == 92
    assert items.loc[330, "image"] is None
    assert (items["overview"] == "").sum() == 18
    # Movie 267 ("unknown") has no release date: created_at falls back to its first rating.
    first = real.events.loc[real.events["item_id"] == 267, "ts"].min()
    assert (
        real.manifest.notes["created_at_from_first_rating"] == [267] and items.loc[267, "created_at"] <= first
    )
    assert items["raw_id"].tolist() == list(range(1, 1683))
    assert set(real.manifest.item_categoricals) == {"genre", "decade"}


@real_data
def test_users_and_requests(real):
    user = real.users.set_index("user_id").loc[1]  # 1|24|M|technician
    assert (user["age_bucket"], user["gender"]) == (2, 1)
    assert user["occupation"] == real.manifest.notes["occupation_ids"]["technician"]
    ev = real.events
    per_request = (
        ev.assign(day=ev["ts"] // 86_400).groupby("request_id")[["user_id", "day", "split"]].nunique()
    )
    assert (per_request == 1).all().all()
    assert ev.groupby(["user_id", ev["ts"] // 86_400, "split"]).ngroups == ev["request_id"].nunique()


def test_tiny_source_text_rules(tiny):
    items = tiny.items.set_index("item_id")
    assert items.loc[1, "title"] == "Alpha (1995). Genres: Action"
    assert items.loc[2, "title"] == "Beta (1981). Genres: Comedy, Drama"
    assert items.loc[3, "title"].startswith("Caf\u00e9 Gamma")  # u.item is latin-1
    assert items.loc[2, "overview"] == "First match wins."
    assert items.loc[1, "overview"] == "A plot, with a comma."
    assert items.loc[3, "overview"] == "" and items.loc[6, "overview"] == ""
    assert items["image"].isna().tolist() == [False] * 5 + [True]
    assert items["genre"].tolist() == [2, 3, 4, 1, 2, 4]
    assert items["decade"].tolist() == [3, 2, 1, 0, 3, 3]  # 1970s, 1980s, 1990s -> 1, 2, 3; missing -> 0
    users = tiny.users.set_index("user_id")
    assert users["age_bucket"].tolist() == [2, 6, 1, 4]
    assert users["occupation"].tolist() == [2, 1, 3, 0]  # "pilot" is not in u.occupation
    assert tiny.manifest.notes["users_with_unknown_occupation"] == 1


def test_neutral_rule(tiny_src, tiny, tmp_path):
    ratings = np.array([int(r.split("\t")[2]) for r in _tiny_ratings()])
    assert len(tiny.events) == int((ratings != 3).sum())
    build_ml100k(tiny_src, tmp_path / "neg", ML100KConfig(neutral="negative", valid_frac=0.2, test_frac=0.2))
    neg = load_dataset(tmp_path / "neg")
    assert len(neg.events) == len(ratings)
    assert int(neg.events["label"].sum()) == int((ratings >= 4).sum()) == int(tiny.events["label"].sum())
    assert neg.manifest.label_rule.endswith("rating 3 -> 0")


def test_cli_writes_then_refuses_to_overwrite(tiny_src, tmp_path, capsys):
    out = tmp_path / "ds"
    args = [
        "data",
        "ml100k",
        "--src",
        str(tiny_src),
        "--out",
        str(out),
        "--valid-frac",
        "0.2",
        "--test-frac",
        "0.2",
    ]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output exists" in err[0]
    assert main([*args, "--force"]) == 0


def test_bad_fractions_are_refused():
    with pytest.raises(MMRankError, match="valid_frac"):
        ML100KConfig(valid_frac=0.6, test_frac=0.5)
    with pytest.raises(MMRankError, match="neutral"):
        ML100KConfig(neutral="positive")


def _edit(rel: str, line: int, text: str | None, encoding: str = "latin-1"):
    """Replace line `line` (1-based) of a source file; append when line is past the end; None deletes it."""

    def apply(root: Path):
        path = root / rel
        lines = path.read_bytes().decode(encoding).split("\n")
        if line > len(lines) - 1:
            lines.insert(len(lines) - 1, text)
        elif text is None:
            del lines[line - 1]
        else:
            lines[line - 1] = text
        path.write_bytes("\n".join(lines).encode(encoding))

    return apply


def _truncate_poster(root: Path):
    path = root / "posters" / "2.jpg"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) * 3 // 4])  # headers intact, scan data cut


def _poster(movie: int, blob: bytes):
    return lambda root: (root / "posters" / f"{movie}.jpg").write_bytes(blob)


END = len(_tiny_ratings()) + 1  # the line an appended rating lands on
BAD_SOURCES = {
    "missing u.data": (lambda r: (r / "ml-100k" / "u.data").unlink(), "u.data", None, None, "missing file"),
    "missing posters": (lambda r: shutil.rmtree(r / "posters"), "posters", None, None, "missing folder"),
    "u.data too few columns": (_edit("ml-100k/u.data", 3, "1\t2\t5"), "u.data", None, 3, "3 '\\t'-separated"),
    "u.data non-integer id": (
        _edit("ml-100k/u.data", 2, "1x\t2\t5\t800000000"),
        "u.data",
        "user_id",
        2,
        "not an integer",
    ),
    "u.data rating out of range": (
        _edit("ml-100k/u.data", 4, "2\t1\t7\t800000000"),
        "u.data",
        "rating",
        4,
        "outside [1, 5]",
    ),
    "u.data unknown movie": (
        _edit("ml-100k/u.data", 99, "1\t9\t5\t800000000"),
        "u.data",
        "item_id",
        END,
        "unknown movie id 9",
    ),
    "u.data unknown user": (
        _edit("ml-100k/u.data", 5, "7\t1\t5\t800000000"),
        "u.data",
        "user_id",
        5,
        "unknown user id 7",
    ),
    "u.data duplicate rating": (
        _edit("ml-100k/u.data", 99, "1\t1\t2\t800000001"),
        "u.data",
        "user_id, item_id",
        END,
        "first on line 1",
    ),
    "u.item duplicate id": (
        _edit("ml-100k/u.item", 5, TINY_ITEMS[4].replace("5|", "2|", 1)),
        "u.item",
        "movie_id",
        5,
        "duplicate 2",
    ),
    "u.item title with a pipe": (
        _edit("ml-100k/u.item", 2, TINY_ITEMS[1].replace("Beta", "Be|ta")),
        "u.item",
        None,
        2,
        "10 '|'-separated columns, expected 9",
    ),
    "u.item bad date": (
        _edit("ml-100k/u.item", 3, TINY_ITEMS[2].replace("01-Jan-1972", "1972/01/01")),
        "u.item",
        "release_date",
        3,
        "not DD-Mon-YYYY",
    ),
    "u.item genre flag": (
        _edit("ml-100k/u.item", 6, TINY_ITEMS[5][:-1] + "2"),
        "u.item",
        "Drama",
        6,
        "outside [0, 1]",
    ),
    "u.item negative id": (
        _edit("ml-100k/u.item", 6, TINY_ITEMS[5].replace("6|", "-6|", 1)),
        "u.item",
        "movie_id",
        6,
        "outside",
    ),
    "u.user non-integer age": (
        _edit("ml-100k/u.user", 2, "2|fifty|F|artist|22222"),
        "u.user",
        "age",
        2,
        "not an integer",
    ),
    "u.user duplicate id": (
        _edit("ml-100k/u.user", 4, "1|40|F|pilot|44444"),
        "u.user",
        "user_id",
        4,
        "duplicate 1",
    ),
    "u.genre out of order": (_edit("ml-100k/u.genre", 2, "Action|5"), "u.genre", "index", 2, "expected 1"),
    "tmdb missing column": (
        _edit("tmdb/items_tmdb.csv", 1, "movie_id,title,plot,year"),
        "items_tmdb.csv",
        "overview",
        1,
        "missing column",
    ),
    "tmdb unknown movie": (
        _edit("tmdb/items_tmdb.csv", 3, "77,Beta,x,1981"),
        "items_tmdb.csv",
        "movie_id",
        3,
        "unknown movie id 77",
    ),
    "tmdb non-integer id": (
        _edit("tmdb/items_tmdb.csv", 6, "5.5,Delta,x,1996"),
        "items_tmdb.csv",
        "movie_id",
        6,
        "not an integer",
    ),
    "truncated poster": (_truncate_poster, "2.jpg", "image", 2, "unreadable image"),
    "poster not a jpeg": (_poster(3, png(4, 4)), "3.jpg", "image", 3, "not a JPEG"),
    "poster header of 20000 x 20000": (
        _poster(2, jpeg_claiming(20000, 20000)),
        "2.jpg",
        "image",
        2,
        "unreadable image (DecompressionBombError",
    ),
    "poster the encoder refuses": (
        _poster(4, jpeg_claiming(30, 1)),
        "4.jpg",
        "image",
        4,
        "image is 30 x 1 pixels, an aspect ratio over the limit of 20:1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_raises_one_error_and_keeps_the_old_output(case, tiny_src, tmp_path):
    corrupt, file, column, row, message = BAD_SOURCES[case]
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    corrupt(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(DataError) as info:
        build_ml100k(src, out, ML100KConfig(valid_frac=0.2, test_frac=0.2), force=True)
    e = info.value
    assert (Path(e.path).name, e.column, e.row) == (file, column, row), str(e)
    assert message in str(e)
    assert {p.name for p in tmp_path.iterdir()} == {"src", "out"}  # no temporary folder left behind
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "old"


def test_empty_split_is_an_error(tiny_src, tmp_path):
    config = replace(ML100KConfig(), valid_frac=0.001, test_frac=0.2)
    with pytest.raises(DataError, match="split 'valid' would be empty") as info:
        build_ml100k(tiny_src, tmp_path / "out", config)
    assert (Path(info.value.path).name, info.value.column) == ("u.data", "timestamp")
    assert not (tmp_path / "out").exists()
