// Markdown for model output, rendered straight to DOM nodes.
//
// Safety by construction: model text only ever reaches the page through text nodes and
// textContent; no string is parsed as HTML, so `<script>` or `<img onerror>` in a reply is shown
// as the characters it is. The only attribute set from model text is a link's href, and only after
// URL parsing says it is http(s).
//
// The subset is what chat models write: paragraphs (single newlines kept as line breaks), ```/~~~
// fenced code, `inline code`, **bold**, *italic*, ~~strike~~, # headings, - and 1. lists (nested by
// indentation), > quotes, --- rules, [links](https://...) and bare http(s) URLs. Anything else is
// plain text. It is re-run on the whole reply as tokens stream in, so an unclosed fence already
// renders as code and an unclosed ** stays literal until its closer arrives.

const MAX_DEPTH = 12; // quotes/lists nest by recursion: a reply of 10k ">" must not blow the stack
const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?/;
const LIST_ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])(?:([ \t]+)(.*))?$/;
const ESCAPABLE = /[!-/:-@[-`{-~]/;
const BARE_URL = /^https?:\/\/[^\s<>"'`]+/i;

/** A DocumentFragment holding `text` rendered as Markdown. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  renderBlocks(text.replace(/\r\n?/g, "\n").split("\n"), fragment, 0);
  return fragment;
}

/** The href to put on a link, or null when `raw` is not an absolute http(s) URL. */
export function safeHref(raw) {
  let url;
  try {
    url = new URL(raw.trim());
  } catch {
    return null;
  }
  return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
}

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function isBlank(line) {
  return line.trim() === "";
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || LIST_ITEM.test(line);
}

function indentOf(line) {
  let width = 0;
  for (const c of line) {
    if (c === " ") width += 1;
    else if (c === "\t") width += 4 - (width % 4);
    else break;
  }
  return width;
}

// Drops `width` columns of leading indentation (tabs count to the next multiple of 4).
function dedent(line, width) {
  let col = 0;
  let i = 0;
  while (i < line.length && col < width && (line[i] === " " || line[i] === "\t")) {
    col += line[i] === "\t" ? 4 - (col % 4) : 1;
    i += 1;
  }
  return line.slice(i);
}

function renderBlocks(lines, parent, depth) {
  if (depth > MAX_DEPTH) {
    const p = el("p");
    renderInline(lines.join("\n"), p);
    parent.append(p);
    return;
  }
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) {
      i += 1;
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      i = renderFence(lines, i, fence, parent);
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      const h = el(`h${heading[1].length}`);
      renderInline(heading[2] ?? "", h);
      parent.append(h);
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      parent.append(el("hr"));
      i += 1;
      continue;
    }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) {
        inner.push(lines[i].replace(QUOTE, ""));
        i += 1;
      }
      const quote = el("blockquote");
      renderBlocks(inner, quote, depth + 1);
      parent.append(quote);
      continue;
    }
    if (LIST_ITEM.test(line)) {
      i = renderList(lines, i, parent, depth);
      continue;
    }
    const paragraph = [];
    while (i < lines.length && !isBlank(lines[i]) && (paragraph.length === 0 || !startsBlock(lines[i]))) {
      paragraph.push(lines[i].trim());
      i += 1;
    }
    const p = el("p");
    renderInline(paragraph.join("\n"), p);
    parent.append(p);
  }
}

// A fenced block up to its closing fence, or to the end of the text while the reply is still
// streaming. Returns the index of the line after it.
function renderFence(lines, start, fence, parent) {
  const [, marker, lang] = fence;
  const indent = indentOf(lines[start]);
  const closing = new RegExp(`^ {0,3}${marker[0] === "`" ? "`" : "~"}{${marker.length},}[ \\t]*$`);
  const body = [];
  let i = start + 1;
  while (i < lines.length && !closing.test(lines[i])) {
    body.push(dedent(lines[i], indent));
    i += 1;
  }
  const block = el("div", "code-block");
  const bar = el("div", "code-bar");
  const label = el("span", "code-lang");
  label.textContent = lang || "text";
  const copy = el("button", "code-copy");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.dataset.copy = "code";
  bar.append(label, copy);
  const pre = el("pre");
  const code = el("code");
  if (lang) code.dataset.lang = lang;
  code.textContent = body.join("\n");
  pre.append(code);
  block.append(bar, pre);
  parent.append(block);
  return i + 1;
}

// One list (bulleted or numbered) from line `start`; each item's own lines are rendered as blocks,
// which is what nests lists and puts code blocks inside items. Returns the index after the list.
function renderList(lines, start, parent, depth) {
  const first = LIST_ITEM.exec(lines[start]);
  const ordered = /\d/.test(first[2]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
  const sameKind = (m) => m !== null && /\d/.test(m[2]) === ordered && (ordered || m[2] === first[2]);
  let i = start;
  let loose = false;
  while (i < lines.length) {
    const item = LIST_ITEM.exec(lines[i]);
    if (!sameKind(item) || indentOf(lines[i]) >= 4) break;
    const gap = item[3] ?? " ";
    // Text starting 5+ columns after the marker is indented code in CommonMark; here it only
    // means the item's content column is one past the marker.
    const contentIndent = item[1].length + item[2].length + (gap.length > 4 ? 1 : gap.length);
    const body = [item[4] ?? ""];
    i += 1;
    while (i < lines.length) {
      const line = lines[i];
      if (isBlank(line)) {
        const next = lines.slice(i + 1).findIndex((l) => !isBlank(l));
        if (next === -1 || indentOf(lines[i + 1 + next]) < contentIndent) break;
        body.push("");
        i += 1;
        continue;
      }
      if (indentOf(line) >= contentIndent) body.push(dedent(line, contentIndent));
      // Models often indent a sub-list by less than the item's content column ("1. a" then "  - b").
      else if (LIST_ITEM.test(line) && indentOf(line) > item[1].length) body.push(line.trimStart());
      else if (!startsBlock(line) && !isBlank(body[body.length - 1])) body.push(line.trim());
      else break;
      i += 1;
    }
    const li = el("li");
    renderBlocks(body, li, depth + 1);
    list.append(li);
    // A blank line between items makes the list loose (spaced out), as in CommonMark.
    if (i < lines.length && isBlank(lines[i])) {
      const next = lines.slice(i).findIndex((l) => !isBlank(l));
      if (next !== -1 && sameKind(LIST_ITEM.exec(lines[i + next]))) {
        loose = true;
        i += next;
      }
    }
  }
  if (!loose) list.classList.add("tight");
  parent.append(list);
  return i;
}

// ---- inline ---------------------------------------------------------------------------------

function appendText(parent, text) {
  const parts = text.split("\n");
  parts.forEach((part, k) => {
    if (k > 0) parent.append(el("br"));
    if (part) parent.append(document.createTextNode(part));
  });
}

function isWordChar(c) {
  return c !== undefined && /[\p{L}\p{N}]/u.test(c);
}

function isSpace(c) {
  return c === undefined || /\s/.test(c);
}

function runLength(text, i, c) {
  let n = 0;
  while (text[i + n] === c) n += 1;
  return n;
}

// Where the emphasis opened by `n` copies of `c` at `from` closes: the next run of exactly n,
// not preceded by a space (and for `_`, not inside a word, so snake_case stays as it is).
function findCloser(text, from, c, n) {
  let j = from;
  while (j < text.length) {
    if (text[j] === "\\") {
      j += 2;
      continue;
    }
    if (text[j] === "`") {
      const ticks = runLength(text, j, "`");
      const end = text.indexOf("`".repeat(ticks), j + ticks);
      j = end === -1 ? j + ticks : end + ticks;
      continue;
    }
    if (text[j] === c) {
      const r = runLength(text, j, c);
      if (r === n && !isSpace(text[j - 1]) && !(c === "_" && isWordChar(text[j + r]))) return j;
      j += r;
      continue;
    }
    j += 1;
  }
  return -1;
}

// `[label](url "title")` at i: [end index, label, href], or null if it is not a complete link.
function parseLink(text, i) {
  let depth = 0;
  let j = i;
  for (; j < text.length; j += 1) {
    if (text[j] === "\\") j += 1;
    else if (text[j] === "[") depth += 1;
    else if (text[j] === "]" && --depth === 0) break;
  }
  if (j >= text.length || text[j + 1] !== "(") return null;
  const close = text.indexOf(")", j + 2);
  if (close === -1) return null;
  let target = text.slice(j + 2, close).trim();
  // The title, if any, is dropped: it would only be a tooltip.
  target = target.startsWith("<") ? target.slice(1, target.indexOf(">")) : target.split(/\s+/)[0];
  return [close + 1, text.slice(i + 1, j), target];
}

function newLink(href) {
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  return a;
}

// Trailing punctuation is the sentence's, not the URL's; so is a ")" that closes nothing in it.
function trimUrl(url) {
  let end = url.length;
  while (end > 0) {
    const c = url[end - 1];
    const head = url.slice(0, end);
    const unmatched = c === ")" && head.split(")").length > head.split("(").length;
    if (".,;:!?'\"".includes(c) || unmatched) end -= 1;
    else break;
  }
  return url.slice(0, end);
}

function renderInline(text, parent, inLink = false) {
  let buffer = "";
  const flush = () => {
    appendText(parent, buffer);
    buffer = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && ESCAPABLE.test(text[i + 1] ?? "")) {
      buffer += text[i + 1];
      i += 2;
      continue;
    }
    if (c === "`") {
      const n = runLength(text, i, "`");
      const end = text.indexOf("`".repeat(n), i + n);
      if (end !== -1 && runLength(text, end, "`") === n) {
        flush();
        const code = el("code");
        let inner = text.slice(i + n, end).replace(/\n/g, " ");
        if (/^ .* $/.test(inner) && inner.trim()) inner = inner.slice(1, -1);
        code.textContent = inner;
        parent.append(code);
        i = end + n;
      } else {
        buffer += "`".repeat(n);
        i += n;
      }
      continue;
    }
    if (c === "*" || c === "_" || c === "~") {
      const run = runLength(text, i, c);
      const n = c === "~" ? 2 : Math.min(run, 3);
      const opens =
        run >= n && !isSpace(text[i + n]) && !(c === "_" && isWordChar(text[i - 1])) && (c !== "~" || run === 2);
      const end = opens ? findCloser(text, i + n, c, n) : -1;
      if (end > i + n) {
        flush();
        const tag = c === "~" ? "del" : n === 1 ? "em" : "strong";
        const outer = el(tag);
        let target = outer;
        if (n === 3) {
          target = el("em");
          outer.append(target);
        }
        renderInline(text.slice(i + n, end), target, inLink);
        parent.append(outer);
        i = end + n;
      } else {
        buffer += c.repeat(run);
        i += run;
      }
      continue;
    }
    if (c === "[" && !inLink) {
      const link = parseLink(text, i);
      const href = link && safeHref(link[2]);
      if (href) {
        flush();
        const a = newLink(href);
        renderInline(link[1], a, true);
        parent.append(a);
        i = link[0];
        continue;
      }
    }
    if (c === "<" && !inLink) {
      const close = text.indexOf(">", i);
      const href = close !== -1 && BARE_URL.test(text.slice(i + 1, close)) && safeHref(text.slice(i + 1, close));
      if (href) {
        flush();
        const a = newLink(href);
        a.textContent = text.slice(i + 1, close);
        parent.append(a);
        i = close + 1;
        continue;
      }
    }
    if ((c === "h" || c === "H") && !inLink && !isWordChar(text[i - 1])) {
      const match = BARE_URL.exec(text.slice(i));
      const url = match && trimUrl(match[0]);
      const href = url && safeHref(url);
      if (href) {
        flush();
        const a = newLink(href);
        a.textContent = url;
        parent.append(a);
        i += url.length;
        continue;
      }
    }
    buffer += c;
    i += 1;
  }
  flush();
}
