"""TFDS builders for the bundled data; importing this package registers `emoji` and
`emoji_scenes` with tfds."""
from unclip_jax.data.builders.emoji_dataset import Emoji
from unclip_jax.data.builders.emoji_scenes_dataset import EmojiScenes
