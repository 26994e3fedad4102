"""The planted-signal synthetic dataset: the embedded default and the scale source (docs/design.md,
"Sources").

The world:
- Items have four latent attributes: shape, colour, texture and theme. They are rendered into content:
  the image shows shape, colour and texture; the title and description name the theme always and the
  colour and texture usually (per-value synonym vocabularies), never the shape. So text and image each
  hold part of the signal and together hold all of it. The categorical ids carry only a coarse part:
  `category` = theme pair, `style` = colour pair (some unknown).
- Users belong to a taste segment; their taste (an affinity per attribute value) is the segment's
  prototype plus a personal part. `age_bucket` and `region` reveal the segment (some unknown).
- Events come in requests: a user, a timestamp and `candidates_per_request` items shown together, drawn
  by exposure popularity or among the freshest items. A candidate is clicked with probability
  sigmoid(bias + content_weight * sum_a taste[u, a, attr_a(i)] + popularity_weight * pop_i + noise).
- Half of the items exist at the start, the rest arrive over the event span, so the valid and test
  windows (the last shares of time) hold cold-start items never shown in training.

Ground truth is kept for tests and analyses only: items carry `latent_<attribute>` (int value index) and
`latent_popularity` columns, users `latent_segment` and `latent_taste_<attribute>` (affinity per value).
The trainer must never read `latent_*` columns: they are the answer the model has to recover from content.

Generation is vectorised: item content is rendered per item (items are few), events are drawn per fixed
block of requests, each block from its own seeded generator. So the data depends only on the seed and
the world parameters, not on `chunk_events`, which only bounds memory and the size of the Parquet parts.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from common.atomic import atomic_dir
from common.errors import MMRankError
from trainer.data.schema import ITEMS, MANIFEST, SPLITS, USERS, EventsWriter, Manifest

REQUESTS_PER_BLOCK = 1024  # one RNG block; changing it changes the data, so it is not a setting
T0 = 1_700_000_000  # first event time (unix seconds); fixed so that the bytes depend on the seed only
DAY = 86_400
PRE_HISTORY_DAYS = 30  # the items present at the start were created over this many days before T0

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": ((215, 40, 40), ("red", "crimson", "scarlet", "ruby")),
    "green": ((40, 165, 60), ("green", "emerald", "jade", "olive")),
    "blue": ((40, 80, 215), ("blue", "navy", "azure", "cobalt")),
    "yellow": ((235, 200, 35), ("yellow", "golden", "amber", "lemon")),
    "purple": ((135, 50, 170), ("purple", "violet", "plum", "lilac")),
    "orange": ((240, 125, 25), ("orange", "tangerine", "copper", "apricot")),
}
TEXTURES = {
    "solid": ("plain", "solid", "smooth", "matte"),
    "striped": ("striped", "lined", "banded", "pinstriped"),
    "dotted": ("dotted", "spotted", "speckled", "polka-dot"),
    "checkered": ("checkered", "plaid", "tartan", "gingham"),
}
THEMES = {
    "travel": ("journey", "voyage", "trip", "expedition"),
    "cooking": ("recipe", "kitchen", "feast", "bakery"),
    "music": ("song", "melody", "concert", "rhythm"),
    "sports": ("match", "league", "tournament", "workout"),
    "science": ("experiment", "laboratory", "discovery", "theory"),
    "fashion": ("outfit", "runway", "wardrobe", "couture"),
    "gaming": ("quest", "arcade", "level", "console"),
    "nature": ("forest", "garden", "river", "meadow"),
}
ATTRIBUTES = {"shape": len(SHAPES), "colour": len(COLOURS), "texture": len(TEXTURES), "theme": len(THEMES)}
MODALITIES = {
    "shape": ["image"],
    "colour": ["image", "text"],
    "texture": ["image", "text"],
    "theme": ["text"],
}
TITLE_LEADS = ("The", "A new", "Ultimate", "Tiny", "Grand", "Modern", "Classic", "Secret", "Daily", "Wild")
OPENERS = ("An item about", "All about", "Notes on", "A collection on", "Everything about", "A guide to")
FILLERS = (
    "Great for weekends.",
    "Limited edition.",
    "Made with care.",
    "Popular with beginners.",
    "A fresh take.",
    "Comes in one size.",
    "Ships quickly.",
    "Loved by many.",
    "",
)
AGE_BUCKETS = 4
REGIONS = 4  # segments = AGE_BUCKETS * REGIONS; each user feature reveals half of the segment

# Independent random streams, so adding draws to one part never shifts another.
_ITEMS, _CONTENT, _USERS, _EVENTS = range(4)


@dataclass
class SynthConfig:
    """World and output parameters; every field is recorded in the manifest's notes."""

    users: int = 2000  # number of users
    items: int = 3000  # number of items, arriving over time
    events: int = 200_000  # impressions (clicks + non-clicks)
    seed: int = 0  # same seed, same bytes
    image_size: int = 32  # side of the rendered RGB item images (>= 8)
    chunk_events: int = 1_000_000  # events per Parquet part, rounded to whole RNG blocks; bounds memory
    candidates_per_request: int = 8  # items shown together in one request (request_id)
    days: float = 60.0  # span of the event log
    valid_frac: float = 0.1  # share of time (the second-to-last) in valid
    test_frac: float = 0.1  # share of time (the last) in test
    initial_item_frac: float = 0.5  # items present before the first event; the rest arrive uniformly
    fresh_frac: float = 0.25  # share of candidates drawn among items created within `fresh_days`
    fresh_days: float = 3.0
    content_weight: float = 1.0  # weight of the taste x attribute match in the click logit
    popularity_weight: float = 0.5  # weight of item popularity (an ID-only signal) in the click logit
    popularity_sigma: float = 1.0  # exposure weight of an item = exp(popularity_sigma * pop)
    noise_sigma: float = 0.5  # per-impression Gaussian noise in the click logit
    bias: float = -2.0  # click logit offset (sets the click rate)
    segment_weight: float = 0.8  # weight of the segment prototype in a user's taste ...
    personal_weight: float = 0.6  # ... and of the user's own draw
    activity_sigma: float = 1.0  # user activity weight = lognormal(0, activity_sigma)
    mention_prob: float = 0.8  # chance that the text names the colour (and, separately, the texture)
    unknown_prob: float = 0.1  # chance that a categorical (item or user) is 0 = unknown

    def __post_init__(self):
        for name in ("users", "items", "events", "image_size", "chunk_events", "candidates_per_request"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise MMRankError(f"synth: {name} must be a positive integer, got {value!r}")
        if self.image_size < 8:
            raise MMRankError(f"synth: image_size must be at least 8 pixels, got {self.image_size}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise MMRankError(f"synth: seed must be a non-negative integer, got {self.seed!r}")
        if self.days <= 0 or self.fresh_days <= 0:
            raise MMRankError(
                f"synth: days and fresh_days must be positive, got {self.days}, {self.fresh_days}"
            )
        if not (self.valid_frac > 0 and self.test_frac > 0 and self.valid_frac + self.test_frac < 1):
            raise MMRankError(
                f"synth: need valid_frac > 0, test_frac > 0 and their sum < 1, got {self.valid_frac}, "
                f"{self.test_frac}"
            )
        for name in ("initial_item_frac", "fresh_frac", "mention_prob", "unknown_prob"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise MMRankError(f"synth: {name} must be in [0, 1], got {value}")

    @property
    def requests(self) -> int:
        return -(-self.events // self.candidates_per_request)

    @property
    def valid_start_ts(self) -> int:
        return T0 + int(self.days * DAY * (1 - self.valid_frac - self.test_frac))

    @property
    def test_start_ts(self) -> int:
        return T0 + int(self.days * DAY * (1 - self.test_frac))


def _rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *index])


def _with_unknown(values: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
    return np.where(rng.random(len(values)) < prob, 0, values).astype(np.int64)


# ----------------------------------------------------------------------------------------------- items
@dataclass
class ItemWorld:
    """Items in creation order: item_id = row + 1."""

    created_at: np.ndarray  # [n] int64, ascending
    attrs: np.ndarray  # [n, len(ATTRIBUTES)] int64 value index per attribute, in ATTRIBUTES order
    popularity: np.ndarray  # [n] float64, standard normal
    exposure_cdf: np.ndarray  # [n] cumulative exposure weight, for prefix sampling of available items


def make_items(cfg: SynthConfig) -> ItemWorld:
    rng = _rng(cfg.seed, _ITEMS)
    n = cfg.items
    n_initial = max(1, round(n * cfg.initial_item_frac))
    before = T0 - rng.random(n_initial) * PRE_HISTORY_DAYS * DAY
    after = T0 + rng.random(n - n_initial) * cfg.days * DAY
    created_at = np.sort(np.concatenate([before, after]).astype(np.int64))
    attrs = np.stack([rng.integers(0, k, n) for k in ATTRIBUTES.values()], axis=1).astype(np.int64)
    popularity = rng.standard_normal(n)
    exposure_cdf = np.cumsum(np.exp(cfg.popularity_sigma * popularity))
    return ItemWorld(created_at, attrs, popularity, exposure_cdf)


def _attr(world: ItemWorld, name: str) -> np.ndarray:
    return world.attrs[:, list(ATTRIBUTES).index(name)]


def item_text(colour: int, texture: int, theme: int, cfg: SynthConfig, rng) -> tuple[str, str]:
    """Title and description of one item; the shape is never written, it is the image-only attribute."""
    theme_words = THEMES[list(THEMES)[theme]]
    colour_words = COLOURS[list(COLOURS)[colour]][1]
    texture_words = TEXTURES[list(TEXTURES)[texture]]
    say_colour, say_texture = rng.random(2) < cfg.mention_prob
    colour_word = colour_words[rng.integers(len(colour_words))]
    title_words = [TITLE_LEADS[rng.integers(len(TITLE_LEADS))]]
    title_words += [colour_word] if say_colour else []
    title_words += [theme_words[rng.integers(len(theme_words))]]
    looks = [texture_words[rng.integers(len(texture_words))]] if say_texture else []
    looks += [colour_words[rng.integers(len(colour_words))]] if say_colour else []
    sentences = [f"{OPENERS[rng.integers(len(OPENERS))]} the {theme_words[rng.integers(len(theme_words))]}."]
    if looks:
        sentences.append(f"It looks {' and '.join(looks)}.")
    sentences.append(FILLERS[rng.integers(len(FILLERS))])
    return " ".join(title_words), " ".join(s for s in sentences if s)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if shape == "triangle":
        return (dy <= 0.8 * r) & (dy >= -r) & (ax <= 0.6 * (dy + r))
    if shape == "diamond":
        return ax + ay <= r
    if shape == "cross":
        arm = r / 3
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str, x: np.ndarray, y: np.ndarray, period: int) -> np.ndarray:
    if texture == "solid":
        return np.ones_like(x, dtype=bool)
    if texture == "striped":
        return ((x + y) // period) % 2 == 0
    if texture == "dotted":
        # Dark dots on the base colour, one per 2-period cell, so they do not merge into a grid.
        cell = 2 * period
        cx, cy = x % cell - (cell - 1) / 2, y % cell - (cell - 1) / 2
        return cx**2 + cy**2 > (cell / 4) ** 2
    if texture == "checkered":
        return ((x // period) + (y // period)) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def render_image(shape: int, colour: int, texture: int, size: int, rng) -> np.ndarray:
    """A [size, size, 3] uint8 picture: a coloured, textured shape on a light noisy background."""
    y, x = np.mgrid[0:size, 0:size]
    centre = size / 2 + (rng.random(2) - 0.5) * size / 4
    radius = size * (0.3 + 0.1 * rng.random())
    inside = _shape_mask(SHAPES[shape], x - centre[0], y - centre[1], radius)
    on = _texture_mask(list(TEXTURES)[texture], x, y, max(2, size // 8))
    base = np.array(COLOURS[list(COLOURS)[colour]][0], dtype=np.float64) + rng.uniform(-20, 20, 3)
    background = 235 + rng.uniform(-15, 15) + rng.uniform(-4, 4, (size, size, 1))
    image = np.broadcast_to(background, (size, size, 3)).copy()
    image[inside & on] = base
    image[inside & ~on] = 0.35 * base
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def item_table(world: ItemWorld, cfg: SynthConfig) -> pa.Table:
    rng = _rng(cfg.seed, _CONTENT)
    titles, descriptions, images = [], [], []
    for shape, colour, texture, theme in tqdm(world.attrs.tolist(), desc="synth items", unit="item"):
        title, description = item_text(colour, texture, theme, cfg, rng)
        titles.append(title)
        descriptions.append(description)
        images.append(png_bytes(render_image(shape, colour, texture, cfg.image_size, rng)))
    n = len(world.created_at)
    cat_rng = _rng(cfg.seed, _ITEMS, 1)
    columns = {
        "item_id": pa.array(np.arange(1, n + 1, dtype=np.int64)),
        "created_at": pa.array(world.created_at),
        "title": pa.array(titles, pa.string()),
        "description": pa.array(descriptions, pa.string()),
        "image": pa.array(images, pa.binary()),
        "category": pa.array(_with_unknown(1 + _attr(world, "theme") // 2, cfg.unknown_prob, cat_rng)),
        "style": pa.array(_with_unknown(1 + _attr(world, "colour") // 2, cfg.unknown_prob, cat_rng)),
    }
    for name in ATTRIBUTES:
        columns[f"latent_{name}"] = pa.array(_attr(world, name))
    columns["latent_popularity"] = pa.array(world.popularity.astype(np.float32))
    return pa.table(columns)


ITEM_CATEGORICALS = {"category": 1 + ATTRIBUTES["theme"] // 2, "style": 1 + ATTRIBUTES["colour"] // 2}


# ----------------------------------------------------------------------------------------------- users
@dataclass
class UserWorld:
    segment: np.ndarray  # [n] int64 in [0, AGE_BUCKETS * REGIONS)
    taste: np.ndarray  # [n, sum of attribute sizes] float32, affinity per attribute value
    activity_cdf: np.ndarray  # [n] cumulative activity weight


def attribute_offsets() -> np.ndarray:
    """Column of value 0 of each attribute in the flat taste matrix."""
    return np.concatenate([[0], np.cumsum(list(ATTRIBUTES.values()))[:-1]]).astype(np.int64)


def make_users(cfg: SynthConfig) -> UserWorld:
    rng = _rng(cfg.seed, _USERS)
    width = sum(ATTRIBUTES.values())
    prototypes = rng.standard_normal((AGE_BUCKETS * REGIONS, width))
    segment = rng.integers(0, AGE_BUCKETS * REGIONS, cfg.users).astype(np.int64)
    personal = rng.standard_normal((cfg.users, width))
    taste = (cfg.segment_weight * prototypes[segment] + cfg.personal_weight * personal).astype(np.float32)
    activity_cdf = np.cumsum(rng.lognormal(0.0, cfg.activity_sigma, cfg.users))
    return UserWorld(segment, taste, activity_cdf)


def user_table(world: UserWorld, cfg: SynthConfig) -> pa.Table:
    rng = _rng(cfg.seed, _USERS, 1)
    n = len(world.segment)
    columns = {
        "user_id": pa.array(np.arange(1, n + 1, dtype=np.int64)),
        "age_bucket": pa.array(_with_unknown(1 + world.segment // REGIONS, cfg.unknown_prob, rng)),
        "region": pa.array(_with_unknown(1 + world.segment % REGIONS, cfg.unknown_prob, rng)),
        "latent_segment": pa.array(world.segment),
    }
    for (name, size), start in zip(ATTRIBUTES.items(), attribute_offsets(), strict=True):
        block = world.taste[:, start : start + size]
        columns[f"latent_taste_{name}"] = pa.FixedSizeListArray.from_arrays(pa.array(block.ravel()), size)
    return pa.table(columns)


USER_FEATURES = {"age_bucket": 1 + AGE_BUCKETS, "region": 1 + REGIONS}


# ---------------------------------------------------------------------------------------------- events
def match_logit(taste: np.ndarray, attrs: np.ndarray) -> np.ndarray:
    """sum_a taste[a, attr_a] per row: taste [n, sum sizes] of the user, attrs [n, A] of the item."""
    cols = attribute_offsets()[None, :] + attrs
    return np.take_along_axis(taste, cols, axis=1).sum(axis=1, dtype=np.float64)


def event_block(block: int, items: ItemWorld, users: UserWorld, cfg: SynthConfig) -> dict[str, np.ndarray]:
    """The events of requests [block * REQUESTS_PER_BLOCK, ...), drawn from the block's own generator."""
    rng = _rng(cfg.seed, _EVENTS, block)
    k = cfg.candidates_per_request
    r0 = block * REQUESTS_PER_BLOCK
    request = np.arange(r0, min(r0 + REQUESTS_PER_BLOCK, cfg.requests), dtype=np.int64)
    n_req = len(request)
    # Request r sits in its own slot of time, so timestamps rise with r without a global sort.
    req_ts = T0 + ((request + rng.random(n_req)) * (cfg.days * DAY / cfg.requests)).astype(np.int64)
    req_user = np.searchsorted(users.activity_cdf, rng.random(n_req) * users.activity_cdf[-1], side="right")
    ts = np.repeat(req_ts, k)
    user = np.minimum(np.repeat(req_user, k), len(users.segment) - 1)
    n = len(ts)
    # Candidates among the items created by ts: by exposure weight, or uniformly among the freshest.
    available = np.searchsorted(items.created_at, ts, side="right")
    fresh_lo = np.searchsorted(items.created_at, ts - int(cfg.fresh_days * DAY), side="left")
    by_pop = np.searchsorted(
        items.exposure_cdf, rng.random(n) * items.exposure_cdf[available - 1], side="right"
    )
    by_pop = np.minimum(by_pop, available - 1)
    fresh = fresh_lo + (rng.random(n) * (available - fresh_lo)).astype(np.int64)
    use_fresh = (rng.random(n) < cfg.fresh_frac) & (available > fresh_lo)
    item = np.where(use_fresh, fresh, by_pop)
    logit = (
        cfg.bias
        + cfg.content_weight * match_logit(users.taste[user], items.attrs[item])
        + cfg.popularity_weight * items.popularity[item]
        + cfg.noise_sigma * rng.standard_normal(n)
    )
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    keep = min(n, cfg.events - r0 * k)
    split = np.select(
        [ts < cfg.valid_start_ts, ts < cfg.test_start_ts], [SPLITS["train"], SPLITS["valid"]], SPLITS["test"]
    )
    chunk = {
        "user_id": user + 1,
        "item_id": item + 1,
        "label": label,
        "ts": ts,
        "request_id": np.repeat(request + 1, k),
        "split": split.astype(np.int8),
    }
    return {name: values[:keep] for name, values in chunk.items()}


@dataclass
class EventTally:
    """Counts kept while streaming; cold = an item never shown in training (train events come first)."""

    num_items: int
    split: np.ndarray = field(default_factory=lambda: np.zeros(len(SPLITS), dtype=np.int64))
    positives: int = 0
    cold_valid: int = 0
    cold_test: int = 0
    seen_in_train: np.ndarray = field(init=False)

    def __post_init__(self):
        self.seen_in_train = np.zeros(self.num_items + 1, dtype=bool)

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        split, item = chunk["split"], chunk["item_id"]
        self.split += np.bincount(split, minlength=3)
        self.positives += int(chunk["label"].sum(dtype=np.int64))
        self.seen_in_train[item[split == SPLITS["train"]]] = True
        cold = ~self.seen_in_train[item]
        self.cold_valid += int((cold & (split == SPLITS["valid"])).sum())
        self.cold_test += int((cold & (split == SPLITS["test"])).sum())


def write_events(root: Path, items: ItemWorld, users: UserWorld, cfg: SynthConfig) -> EventTally:
    writer = EventsWriter(root)
    tally = EventTally(cfg.items)
    n_blocks = -(-cfg.requests // REQUESTS_PER_BLOCK)
    per_chunk = max(1, cfg.chunk_events // (REQUESTS_PER_BLOCK * cfg.candidates_per_request))
    with tqdm(total=cfg.events, desc="synth events", unit="ev", unit_scale=True, smoothing=0.1) as bar:
        for first in range(0, n_blocks, per_chunk):
            blocks = [
                event_block(b, items, users, cfg) for b in range(first, min(first + per_chunk, n_blocks))
            ]
            chunk = {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}
            del blocks
            tally.add(chunk)
            writer.write(chunk)
            bar.update(len(chunk["ts"]))
    return tally


# ------------------------------------------------------------------------------------------- the folder
LABEL_RULE = (
    "impression clicked (1) or shown and not clicked (0); click ~ Bernoulli(sigmoid(bias + content_weight * "
    "sum_a taste[user, a, attr_a(item)] + popularity_weight * pop_item + N(0, noise_sigma^2)))"
)


def generate(out: str | Path, cfg: SynthConfig, force: bool = False) -> Manifest:
    """Write the dataset folder `out` (replaced atomically; an existing non-empty folder needs `force`)."""
    with atomic_dir(out, force) as tmp:
        items = make_items(cfg)
        pq.write_table(item_table(items, cfg), tmp / ITEMS, compression="zstd")
        users = make_users(cfg)
        pq.write_table(user_table(users, cfg), tmp / USERS, compression="zstd")
        tally = write_events(tmp, items, users, cfg)
        empty = [name for name, code in SPLITS.items() if tally.split[code] == 0]
        if empty:
            raise MMRankError(
                f"synth: {cfg.events} events leave the {', '.join(empty)} split(s) empty; use more events"
            )
        manifest = Manifest(
            name="synth",
            source="synth",
            seed=cfg.seed,
            label_rule=LABEL_RULE,
            counts={
                "users": cfg.users,
                "items": cfg.items,
                "events": cfg.events,
                "requests": cfg.requests,
                "train": int(tally.split[SPLITS["train"]]),
                "valid": int(tally.split[SPLITS["valid"]]),
                "test": int(tally.split[SPLITS["test"]]),
                "positives": tally.positives,
                "cold_valid_events": tally.cold_valid,
                "cold_test_events": tally.cold_test,
            },
            splits={"valid_start_ts": cfg.valid_start_ts, "test_start_ts": cfg.test_start_ts},
            text_fields=["title", "description"],
            item_categoricals=dict(ITEM_CATEGORICALS),
            user_features=dict(USER_FEATURES),
            has_images=True,
            notes={
                "generator": asdict(cfg),
                "requests_per_block": REQUESTS_PER_BLOCK,
                "attributes": {
                    name: {"values": size, "shown_in": MODALITIES[name]} for name, size in ATTRIBUTES.items()
                },
                "latent_columns": "items latent_*, users latent_*: ground truth for tests only; never a model input",
                "cold": "cold_*_events: events on items never shown in train",
            },
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


def config_from_args(args) -> SynthConfig:
    return SynthConfig(
        **{f.name: getattr(args, f.name) for f in fields(SynthConfig) if hasattr(args, f.name)}
    )


def cli(args) -> int:
    cfg = config_from_args(args)
    m = generate(args.out, cfg, force=args.force)
    c = m.counts
    print(
        f"synth: wrote {args.out}: {c['users']} users, {c['items']} items, {c['events']} events "
        f"(train {c['train']}, valid {c['valid']}, test {c['test']}), click rate {c['positives'] / c['events']:.3f}, "
        f"cold test events {c['cold_test_events']}, seed {m.seed}"
    )
    return 0
