"""The commands and Python snippets of README.md and docs/*.md, read from the
text for tests/test_docs_run.py: where each is (file and line), whether it runs
there, and the substitutions that make it run on the tiny test chain.

What is collected: every fenced ```python block, and every command that runs
`python -m unclip_jax.<tool>` or a script under launch/: a line of any other
fenced block (continuations joined, `NAME="..."` assignments expanded, `&&`
split; in a block of `$ ` prompts only the prompted lines), or an inline
`code span` that starts with one and has arguments (a bare `python -m
unclip_jax.sample` is a name, not a command).

A doc marks what cannot run on two CPU cores in seconds with a comment, which
renders as nothing:

    <!-- doc-test: skip (needs a Cloud TPU slice) -->

on its own line right before a fence (the whole block) or a paragraph or table
(every command in it), or directly before one inline command. A command with
placeholders (`...`, `<stage>`, `a|b`, an upper-case word such as DIR) is a
synopsis, skipped without a marker; `[--optional flags]` are left out. A command
that is an earlier one once substituted is skipped as that one (with its
reason, if that one is marked). A marker that marks nothing is an error
(`stray_markers`).
"""
import dataclasses
import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

MARKER = re.compile(r"<!--\s*doc-test:\s*skip\s*\((.*?)\)\s*-->", re.S)
FENCE = re.compile(r"^[ \t]*```(\w*)[ \t]*$")
# A command starts with env assignments, a wrapper (time, sbatch) and then
# `python -m unclip_jax.` or launch/.
COMMAND_START = re.compile(
    r"^(?:\w+=\S+\s+)*(?:/usr/bin/time(?:\s+-v)?\s+|sbatch\s+(?:--\S+\s+)*)?"
    r"(?:python\s+-m\s+unclip_jax\.|launch/)")
INLINE = re.compile(r"(<!--\s*doc-test:[^>]*-->[ \t]*\n?[ \t]*)?`([^`]+)`")
OPTIONAL = re.compile(r"\s+\[[^\]\[]*\]")
ASSIGNMENT = re.compile(r"^(\w+)=(\"[^\"]*\"|'[^']*'|\S*)$")
STAGES = ("clip", "prior", "decoder", "upsampler")
WORKDIRS = r"(?<![\w/.-])(?:W|runs|workdirs/demo|/tmp/demo)/"
STAGE_PATH = re.compile(WORKDIRS + r"(clip|prior|decoder|upsampler)(?![\w/.-])")
# The demo's second upsampler, in a list or as a flag: the tiny chain has one.
SECOND_UPSAMPLER = re.compile(rf",\s*\"{WORKDIRS}upsampler2\""
                              rf"|\s--upsampler[= ]{WORKDIRS}upsampler2\b")
PRESET = re.compile(r"(?<![\w/.-])configs/(\w+)\.py:\w+")
PLACEHOLDER = re.compile(r"\.\.\.|<\w+>|\w\|\w|(?<![\w.=/-])[A-Z][A-Z_]*(?![\w.-])")
STAGE_PATH_PREFIX = re.compile(r"(?<![\w/.-])W/")  # W/clip: substituted, not a placeholder


@dataclasses.dataclass(frozen=True)
class Snippet:
  doc: str  # relative to the repository: "docs/sampling.md"
  line: int  # where it starts, 1-based
  kind: str  # "python" or "shell"
  text: str  # the code, or one command on one line
  skip: str | None = None  # why it does not run here

  @property
  def id(self) -> str:
    return f"{self.doc}:{self.line}"


def _marker_before(lines: list[str], index: int) -> str | None:
  """The reason of a marker alone on the line just before lines[index]."""
  if index > 0:
    found = MARKER.fullmatch(lines[index - 1].strip())
    if found:
      return " ".join(found.group(1).split())
  return None


def _logical_lines(block: list[str], first: int):
  """(line number, text) of a shell block, `\\` continuations joined."""
  pending, start = "", first
  for number, line in enumerate(block, first):
    if not pending:
      start = number
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    yield start, pending + line
    pending = ""


def _block_commands(block: list[str], first: int):
  """(line, command) for each command of a fenced shell block."""
  prompted = any(line.startswith("$ ") for line in block)
  variables = {}
  for number, line in _logical_lines(block, first):
    line = line.strip()
    if prompted:
      if not line.startswith("$ "):
        continue  # the output shown after a prompt
      line = line[2:]
    if not line or line.startswith("#"):
      continue
    assigned = ASSIGNMENT.match(line)
    if assigned:
      variables[assigned.group(1)] = assigned.group(2).strip("\"'")
      continue
    for name, value in variables.items():
      line = re.sub(rf"\${{?{name}\b}}?", lambda _, v=value: v, line)
    for part in line.split(" && "):
      if COMMAND_START.match(part.strip()):
        yield number, " ".join(part.split())


def _blank_fences(text: str) -> str:
  """The text with fenced blocks blanked, lines kept: for inline spans."""
  lines, inside = text.split("\n"), False
  for index, line in enumerate(lines):
    if FENCE.match(line):
      inside = not inside
      lines[index] = ""
    elif inside:
      lines[index] = ""
  return "\n".join(lines)


def _paragraph_skips(text: str) -> dict[int, str]:
  """{line: reason} for the lines of each paragraph a marker line precedes."""
  lines, skips = text.split("\n"), {}
  for index, line in enumerate(lines):
    reason = _marker_before(lines, index)
    if reason is None or FENCE.match(line):
      continue
    while index < len(lines) and lines[index].strip():
      skips[index + 1] = reason
      index += 1
  return skips


def _has_arguments(command: str) -> bool:
  program = re.search(r"-m\s+\S+|launch/\S*", command)
  return bool(command[program.end():].strip())


def _inline_commands(doc: str, text: str) -> list[Snippet]:
  plain = _blank_fences(text)
  paragraph = _paragraph_skips(plain)
  found = []
  for match in INLINE.finditer(plain):
    command = " ".join(match.group(2).split())
    if not COMMAND_START.match(command) or not _has_arguments(command):
      continue
    line = plain.count("\n", 0, match.start(2)) + 1
    marker = MARKER.search(match.group(1) or "")
    skip = (" ".join(marker.group(1).split()) if marker
            else paragraph.get(line))
    found.append(Snippet(doc, line, "shell", command, skip))
  return found


def _fenced(doc: str, text: str) -> list[Snippet]:
  lines, found, index = text.split("\n"), [], 0
  while index < len(lines):
    opening = FENCE.match(lines[index])
    if not opening:
      index += 1
      continue
    end = index + 1
    while not FENCE.match(lines[end]):
      end += 1
    skip, block = _marker_before(lines, index), lines[index + 1:end]
    if opening.group(1) == "python":
      found.append(Snippet(doc, index + 2, "python", "\n".join(block), skip))
    else:
      found += [Snippet(doc, number, "shell", command, skip)
                for number, command in _block_commands(block, index + 2)]
    index = end + 1
  return found


def synopsis(command: str) -> bool:
  """Whether a command has placeholders (after `[...]` options are dropped)."""
  return bool(PLACEHOLDER.search(STAGE_PATH_PREFIX.sub("", without_options(command))))


def without_options(command: str) -> str:
  return OPTIONAL.sub("", command)


def collect() -> list[Snippet]:
  """Every snippet and command of the docs, in document order per doc; a
  command that is another's once substituted is skipped as that one."""
  found, seen = [], {}
  for path in DOCS:
    text = path.read_text(encoding="utf-8")
    doc = str(path.relative_to(ROOT))
    found += sorted(_fenced(doc, text) + _inline_commands(doc, text),
                    key=lambda s: s.line)
  for index, snippet in enumerate(found):
    if snippet.kind != "shell" or (snippet.skip is None and synopsis(snippet.text)):
      if snippet.kind == "shell":
        found[index] = dataclasses.replace(
            snippet, skip="a synopsis with placeholders, not a command")
      continue
    key = _form(snippet.text)
    if key in seen and snippet.skip is None:
      first = seen[key]
      found[index] = dataclasses.replace(snippet, skip=(
          f"as {first.id}: {first.skip}" if first.skip
          else f"runs as {first.id} does, once substituted"))
    seen.setdefault(key, snippet)
  return found


def tool_and_args(command: str) -> tuple[str, list[str]]:
  """(`unclip_jax.<tool>`, its arguments) of `python -m unclip_jax.<tool> ...`,
  or of the train command `launch/local.sh [--fake-devices N] [--processes P]
  CONFIG WORKDIR ARGS` runs."""
  words = shlex.split(SECOND_UPSAMPLER.sub("", without_options(command)))
  if words[0] == "launch/local.sh":
    while len(words) > 1 and words[1] in ("--fake-devices", "--processes"):
      del words[1:3]
    return "unclip_jax.train", ["--config", words[1], "--workdir", *words[2:]]
  if words[:2] != ["python", "-m"]:
    raise ValueError(f"{command!r} cannot run here: mark it (doc_snippets.py)")
  return words[2], words[3:]


def substitute(text: str, stage_dirs: dict[str, str], tfds_dir: str) -> str:
  """Presets made tiny (this checkout's configs), stage workdirs made
  stage_dirs[stage] (a second upsampler left out), the data_dir /tmp/tfds made
  tfds_dir."""
  text = SECOND_UPSAMPLER.sub("", text)
  text = PRESET.sub(lambda m: f"{ROOT}/configs/{m.group(1)}.py:tiny", text)
  text = STAGE_PATH.sub(lambda m: stage_dirs[m.group(1)], text)
  return text.replace("/tmp/tfds", tfds_dir)


def with_workdir(tool: str, args: list[str], workdir: str) -> list[str]:
  """The --workdir that train or bench writes made `workdir`."""
  if tool not in ("unclip_jax.train", "unclip_jax.bench"):
    return args
  args = list(args)
  for index, arg in enumerate(args):
    if arg == "--workdir":
      args[index + 1] = workdir
    elif arg.startswith("--workdir="):
      args[index] = f"--workdir={workdir}"
  return args


def _form(command: str) -> tuple[str, ...]:
  """A command once substituted, its paths as names: equal forms run alike."""
  try:
    tool, args = tool_and_args(command)
  except ValueError:  # not one this test could run: its own form
    return (command,)
  names = {stage: f"<{stage}>" for stage in STAGES}
  return (tool, *(substitute(a, names, "<tfds>")
                  for a in with_workdir(tool, args, "<new>")))


def _covered(lines: list[str], index: int) -> int:
  """The last line (1-based) of what the marker on lines[index] marks."""
  end = index + 1
  if MARKER.sub("", lines[index]).strip() or end == len(lines):
    return end + 1  # inline: the span starts on its line or the next
  if FENCE.match(lines[end]):
    end += 1
    while not FENCE.match(lines[end]):
      end += 1
    return end + 1
  while end < len(lines) and lines[end].strip():
    end += 1
  return end


def stray_markers() -> list[str]:
  """Markers that mark nothing (a typo, or what they marked is gone)."""
  marked = [s for s in collect() if s.skip]
  stray = []
  for path in DOCS:
    lines = path.read_text(encoding="utf-8").split("\n")
    doc = str(path.relative_to(ROOT))
    for index, line in enumerate(lines):
      for match in MARKER.finditer(line):
        reason = " ".join(match.group(1).split())
        if not any(s.doc == doc and s.skip == reason
                   and index < s.line <= _covered(lines, index) for s in marked):
          stray.append(f"{doc}:{index + 1}")
  return stray

