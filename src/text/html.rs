//! HTML -> a flat sequence of headers and text blocks, boilerplate removed.
//!
//! # Why html5ever's tokenizer and our own element stack
//! html5ever's *tree builder* checks element scopes by walking the stack of open elements for many
//! start tags: O(depth) per tag, so a page nested 100,000 levels deep costs O(n^2), and a DOM of
//! that depth is then walked recursively. We only need a stream of text with a little structure,
//! so we use html5ever's tokenizer (spec-exact tokenisation: entities, raw text of `<script>` and
//! `<style>`, comments, CDATA) and drive a small stack of our own:
//!
//! * every operation is O(1) amortised: "is a `<p>` open in scope?" is answered by per-kind stacks
//!   of positions (`<p>`, `<li>`, cells, rows, scope boundaries, ...) instead of a walk; an end tag
//!   for an element that is not open is recognised by a per-name count and ignored in O(1); popping
//!   is amortised against pushing;
//! * the stack has a depth cap ([`ExtractOptions::max_depth`]): beyond it, start tags still break
//!   blocks but are not pushed (the nesting is flattened) and [`ExtractedPage::flattened_depth`] is
//!   set. Text is never lost to the cap; only boilerplate elements opened beyond it are not removed;
//! * implicit closes follow the HTML standard where it matters for text: a block start closes an
//!   open `<p>`, `<li>` closes the previous `<li>` of its list, `<dt>`/`<dd>` likewise, cells and
//!   rows close within their table, a header start ends an open header, `<a>` closes an open `<a>`.
//!
//! # Output
//! `h1`..`h6` become [`Block::Heading`]; text of block-level elements (`p`, `li`, `dt`/`dd`, `pre`,
//! `blockquote`, `td`/`th`, text directly in `div`, `figcaption`, ...) becomes [`Block::Text`] with
//! whitespace collapsed (`pre` keeps its newlines). Inline elements (`a`, `code`, `em`, `span`...)
//! join the text around them.
//!
//! # Boilerplate
//! Always removed with their content: `script`, `style`, `noscript`, `template`, `svg`, `math`,
//! `nav`, `footer`, `aside`, `form`, `button`, `select`, `textarea`, `iframe`, `object`, `canvas`,
//! `audio`, `video`, `menu`, and `header` unless inside `article`/`main`/`section` (there it heads
//! the content, like ARIA's banner rule). Elements with the `hidden` attribute are removed.
//!
//! Attribute rules (configurable, [`ExtractOptions`]): an element is removed when its `role` is one
//! of [`ExtractOptions::skip_roles`], or a `class` token contains one of
//! [`ExtractOptions::skip_class_words`] as a whole `-`/`_`-separated part (`main-nav`, `sidebar-left`,
//! `sphinxsidebar`, but not `canvas` or `unavailable`), or a short `id` (at most two parts) does.
//! Guards against removing the content: `html`, `body`, `main`, `article` and anything with
//! `role="main"` are never removed by attributes; `section` ids (which are slugs of their header
//! text, `cookie-objects`) are not looked at; tokens starting with a state prefix (`has-sidebar`,
//! `no-menu`, `is-nav-open`) are not matches. And if the attribute rules removed more than
//! [`ExtractOptions::max_attribute_drop_ratio`] of the page's text, they are assumed to have hit the
//! content wrapper and the page is extracted again without them.
//!
//! Why one file of this size: the extractor is one tokenizer sink (element stack, block building,
//! the boilerplate rules above, the re-extraction guard) whose rules read the same state.

use crate::records::Block;
use html5ever::tendril::StrTendril;
use html5ever::tokenizer::states::RawKind;
use html5ever::tokenizer::{
    BufferQueue, Tag, TagKind, Token, TokenSink, TokenSinkResult, Tokenizer, TokenizerOpts,
};
use html5ever::{local_name, LocalName, TokenizerResult};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

/// Options of [`extract`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExtractOptions {
    /// Open elements tracked at most; deeper nesting is flattened.
    pub max_depth: usize,
    /// Words that mark a `class` token or a short `id` as boilerplate (matched against whole
    /// `-`/`_`-separated parts, case-insensitively).
    pub skip_class_words: Vec<String>,
    /// ARIA roles whose elements are boilerplate.
    pub skip_roles: Vec<String>,
    /// Leading parts of a class token that describe a state, not the element (`has-sidebar`).
    pub state_prefixes: Vec<String>,
    /// If the attribute rules remove more than this fraction of the text, extract again without them.
    pub max_attribute_drop_ratio: f64,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        let words = [
            "nav",
            "navbar",
            "navigation",
            "navlinks",
            "menu",
            "menubar",
            "sidebar",
            "sphinxsidebar",
            "sphinxsidebarwrapper",
            "related",
            "breadcrumb",
            "breadcrumbs",
            "footer",
            "cookie",
            "cookies",
            "consent",
            "gdpr",
            "headerlink",
            "skip",
            "share",
            "sharing",
            "social",
            "pagination",
            "pager",
            "advert",
            "advertisement",
            "ads",
            "sponsored",
            "widget",
            "masthead",
            "topbar",
            "subscribe",
            "newsletter",
            "popup",
        ];
        let roles = [
            "navigation",
            "banner",
            "contentinfo",
            "complementary",
            "search",
            "menu",
            "menubar",
            "toolbar",
        ];
        let prefixes = [
            "has", "with", "no", "show", "hide", "is", "open", "toggle", "js",
        ];
        ExtractOptions {
            max_depth: 512,
            skip_class_words: words.iter().map(|s| s.to_string()).collect(),
            skip_roles: roles.iter().map(|s| s.to_string()).collect(),
            state_prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
            max_attribute_drop_ratio: 0.95,
        }
    }
}

/// A page's text after extraction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtractedPage {
    /// The `<title>`, whitespace collapsed, if present and not empty.
    pub title: Option<String>,
    /// Headers and text blocks in document order.
    pub blocks: Vec<Block>,
    /// Whether nesting deeper than [`ExtractOptions::max_depth`] was flattened.
    pub flattened_depth: bool,
}

impl ExtractedPage {
    /// A page from text extracted upstream (WET, JSONL): no headers, one block per paragraph.
    /// Paragraphs are separated by blank lines when the text has any, else by line breaks.
    pub fn from_plain_text(text: &str) -> ExtractedPage {
        let text = text.replace("\r\n", "\n");
        let has_blank_lines = text
            .split('\n')
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w[1].trim().is_empty() && !w[0].trim().is_empty());
        let mut blocks = Vec::new();
        let mut push = |para: &str| {
            let collapsed = collapse_whitespace(para);
            if !collapsed.is_empty() {
                blocks.push(Block::Text(collapsed));
            }
        };
        if has_blank_lines {
            let mut current = String::new();
            for line in text.split('\n') {
                if line.trim().is_empty() {
                    push(&current);
                    current.clear();
                } else {
                    current.push(' ');
                    current.push_str(line);
                }
            }
            push(&current);
        } else {
            text.split('\n').for_each(&mut push);
        }
        ExtractedPage {
            title: None,
            blocks,
            flattened_depth: false,
        }
    }

    /// Total characters of text (headers and blocks).
    pub fn text_chars(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| match b {
                Block::Heading { text, .. } | Block::Text(text) => text.chars().count(),
            })
            .sum()
    }
}

/// Collapses runs of whitespace to one space and trims.
pub fn collapse_whitespace(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pending = false;
    push_collapsed(&mut out, &mut pending, s);
    out
}

/// Appends `s` to `buf`, collapsing whitespace; `pending` carries "a space is due" across calls so
/// that text split over several tokens collapses the same way.
fn push_collapsed(buf: &mut String, pending: &mut bool, s: &str) {
    let mut first = true;
    for part in s.split(char::is_whitespace) {
        if !first {
            *pending = true;
        }
        first = false;
        if part.is_empty() {
            continue;
        }
        if *pending && !buf.is_empty() {
            buf.push(' ');
        }
        *pending = false;
        buf.push_str(part);
    }
}

/// Extracts `html` with `opts` (compiles the options each call; reuse an [`Extractor`] in loops).
pub fn extract(html: &str, opts: &ExtractOptions) -> ExtractedPage {
    Extractor::new(opts).extract(html)
}

/// Extraction with compiled options: build once, use for many pages.
#[derive(Clone, Debug)]
pub struct Extractor {
    max_depth: usize,
    class_words: HashSet<String>,
    roles: HashSet<String>,
    state_prefixes: HashSet<String>,
    max_attribute_drop_ratio: f64,
}

impl Extractor {
    /// Compiles `opts`.
    pub fn new(opts: &ExtractOptions) -> Self {
        let lower = |v: &[String]| v.iter().map(|s| s.to_ascii_lowercase()).collect();
        Extractor {
            max_depth: opts.max_depth.max(1),
            class_words: lower(&opts.skip_class_words),
            roles: lower(&opts.skip_roles),
            state_prefixes: lower(&opts.state_prefixes),
            max_attribute_drop_ratio: opts.max_attribute_drop_ratio,
        }
    }

    /// Extracts one page. Never panics on any input; linear in the input size.
    pub fn extract(&self, html: &str) -> ExtractedPage {
        let (page, kept, attr_dropped) = self.run(html, true);
        let total = kept + attr_dropped;
        if attr_dropped > 0 && attr_dropped as f64 > self.max_attribute_drop_ratio * total as f64 {
            return self.run(html, false).0;
        }
        page
    }

    /// One pass; returns the page, the bytes of text kept and the bytes removed by attribute rules.
    fn run(&self, html: &str, attribute_rules: bool) -> (ExtractedPage, usize, usize) {
        let sink = Sink {
            state: RefCell::new(State::new(self, attribute_rules)),
        };
        let tokenizer = Tokenizer::new(sink, TokenizerOpts::default());
        let input = BufferQueue::default();
        // Tendrils are limited to u32 lengths: feed in chunks, cut at char boundaries.
        const CHUNK: usize = 1 << 20;
        let mut rest = html;
        while !rest.is_empty() {
            let mut cut = rest.len().min(CHUNK);
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            input.push_back(StrTendril::from_slice(&rest[..cut]));
            rest = &rest[cut..];
        }
        // We never return `Script`, so feed runs to the end in one call; loop to be safe.
        while let TokenizerResult::Script(()) = tokenizer.feed(&input) {}
        tokenizer.end();
        let mut state = tokenizer.sink.state.into_inner();
        state.finish();
        let page = ExtractedPage {
            title: state.title.take(),
            blocks: std::mem::take(&mut state.blocks),
            flattened_depth: state.flattened,
        };
        (page, state.kept_bytes, state.attr_dropped_bytes)
    }
}

// ---- tag classification

/// Flushes the text buffer at start and end: the element makes its own block.
const BLOCK: u16 = 1;
/// Boilerplate: the element and its content are removed.
const SKIP: u16 = 1 << 1;
/// Keeps whitespace.
const PRE: u16 = 1 << 2;
/// `article`, `main`, `section`: a `<header>` inside heads content.
const SECTIONING: u16 = 1 << 3;
/// `svg`, `math`: foreign content (CDATA sections allowed, no raw text states).
const FOREIGN: u16 = 1 << 4;
/// Never has content or an end tag.
const VOID: u16 = 1 << 5;
/// `html`, `head`, `body`: structure only, never pushed (their end tags are ignored, as browsers do).
const NOPUSH: u16 = 1 << 6;
/// Its start tag closes an open `<p>`.
const CLOSES_P: u16 = 1 << 7;
/// `<header>`: boilerplate outside sectioning content.
const HEADER_ELEMENT: u16 = 1 << 8;
/// `<br>`.
const BR: u16 = 1 << 9;
/// Never removed by attribute rules.
const KEEP: u16 = 1 << 10;

/// Per-kind stacks of open element positions, for O(1) implicit-close checks.
#[derive(Clone, Copy)]
enum Track {
    P = 0,
    Li,
    DtDd,
    Cell,
    Row,
    TSection,
    List,
    Dl,
    Table,
    A,
    Scope,
}
const N_TRACKS: usize = 11;

fn bit(t: Track) -> u16 {
    1 << (t as u16)
}

/// How the tokenizer must read an element's content.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Raw {
    /// `<title>`, `<textarea>`: text with entities, until the end tag.
    Rcdata,
    /// `<style>`, `<iframe>`, `<noscript>`, `<xmp>`...: text until the end tag.
    Rawtext,
    /// `<script>`.
    Script,
    /// `<plaintext>`: everything after it is text.
    Plaintext,
}

#[derive(Clone, Copy)]
struct TagInfo {
    flags: u16,
    tracks: u16,
    heading: u8,
    raw: Option<Raw>,
}

fn classify(name: &str) -> TagInfo {
    let mut info = TagInfo {
        flags: 0,
        tracks: 0,
        heading: 0,
        raw: None,
    };
    let block_p = BLOCK | CLOSES_P;
    match name {
        "p" => {
            info.flags = block_p;
            info.tracks = bit(Track::P);
        }
        "div" | "blockquote" | "figure" | "figcaption" | "address" | "center" | "details"
        | "summary" | "dialog" | "hgroup" | "fieldset" | "listing" => info.flags = block_p,
        "article" | "section" => info.flags = block_p | SECTIONING,
        "main" => info.flags = block_p | SECTIONING | KEEP,
        "ul" | "ol" | "dir" => {
            info.flags = block_p;
            info.tracks = bit(Track::List);
        }
        "dl" => {
            info.flags = block_p;
            info.tracks = bit(Track::Dl);
        }
        "li" => {
            info.flags = block_p;
            info.tracks = bit(Track::Li);
        }
        "dt" | "dd" => {
            info.flags = block_p;
            info.tracks = bit(Track::DtDd);
        }
        "pre" => info.flags = block_p | PRE,
        "h1" | "h2" | "h3" | "h4" | "h5" | "h6" => {
            info.flags = block_p;
            info.heading = name.as_bytes()[1] - b'0';
        }
        "table" => {
            info.flags = block_p;
            info.tracks = bit(Track::Table) | bit(Track::Scope);
        }
        "td" | "th" => {
            info.flags = BLOCK;
            info.tracks = bit(Track::Cell) | bit(Track::Scope);
        }
        "tr" => {
            info.flags = BLOCK;
            info.tracks = bit(Track::Row);
        }
        "tbody" | "thead" | "tfoot" => {
            info.flags = BLOCK;
            info.tracks = bit(Track::TSection);
        }
        "caption" => {
            info.flags = BLOCK;
            info.tracks = bit(Track::Scope);
        }
        "legend" | "option" | "optgroup" => info.flags = BLOCK,
        "a" => info.tracks = bit(Track::A),
        "applet" | "marquee" => info.tracks = bit(Track::Scope),
        "html" | "body" | "head" => info.flags = BLOCK | NOPUSH | KEEP,
        "header" => info.flags = block_p | HEADER_ELEMENT,
        "nav" | "footer" | "aside" | "form" | "menu" => info.flags = block_p | SKIP,
        "button" => {
            info.flags = SKIP;
            info.tracks = bit(Track::Scope);
        }
        "object" => {
            info.flags = SKIP;
            info.tracks = bit(Track::Scope);
        }
        "template" => {
            info.flags = BLOCK | SKIP;
            info.tracks = bit(Track::Scope);
        }
        "select" | "canvas" | "audio" | "video" | "datalist" | "map" => info.flags = SKIP,
        "svg" | "math" => info.flags = SKIP | FOREIGN,
        "hr" => info.flags = BLOCK | CLOSES_P | VOID,
        "br" => info.flags = VOID | BR,
        "area" | "base" | "basefont" | "bgsound" | "col" | "embed" | "img" | "input" | "keygen"
        | "link" | "meta" | "param" | "source" | "track" | "wbr" | "frame" => info.flags = VOID,
        "title" => info.raw = Some(Raw::Rcdata),
        "textarea" => {
            info.flags = SKIP;
            info.raw = Some(Raw::Rcdata);
        }
        "script" => {
            info.flags = SKIP;
            info.raw = Some(Raw::Script);
        }
        "style" | "noscript" | "iframe" | "noembed" | "noframes" => {
            info.flags = SKIP;
            info.raw = Some(Raw::Rawtext);
        }
        "xmp" => {
            info.flags = block_p | SKIP;
            info.raw = Some(Raw::Rawtext);
        }
        "plaintext" => {
            info.flags = block_p | PRE;
            info.raw = Some(Raw::Plaintext);
        }
        _ => {}
    }
    info
}

/// HTML start tags that end foreign (SVG/MathML) content (HTML standard, "in foreign content").
fn breaks_out_of_foreign(name: &str) -> bool {
    matches!(
        name,
        "b" | "big"
            | "blockquote"
            | "body"
            | "br"
            | "center"
            | "code"
            | "dd"
            | "div"
            | "dl"
            | "dt"
            | "em"
            | "embed"
            | "h1"
            | "h2"
            | "h3"
            | "h4"
            | "h5"
            | "h6"
            | "head"
            | "hr"
            | "i"
            | "img"
            | "li"
            | "listing"
            | "menu"
            | "meta"
            | "nobr"
            | "ol"
            | "p"
            | "pre"
            | "ruby"
            | "s"
            | "small"
            | "span"
            | "strong"
            | "strike"
            | "sub"
            | "sup"
            | "table"
            | "tt"
            | "u"
            | "ul"
            | "var"
    )
}

/// A cheap hasher for interned tag names: an atom hashes as one precomputed `u32`, which only
/// needs spreading, not SipHash.
#[derive(Default)]
struct AtomHasher(u64);

impl std::hash::Hasher for AtomHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type AtomMap<V> = HashMap<LocalName, V, std::hash::BuildHasherDefault<AtomHasher>>;

// ---- the stack machine

struct Frame {
    name: LocalName,
    flags: u16,
    tracks: u16,
    heading: u8,
    /// Removed (boilerplate) by its tag (`Some(false)`) or by an attribute rule (`Some(true)`).
    skip: Option<bool>,
}

struct HeadingState {
    level: u8,
    /// Stack index of the header element.
    index: usize,
    text: String,
    pending: bool,
}

struct State<'a> {
    ex: &'a Extractor,
    attribute_rules: bool,
    stack: Vec<Frame>,
    open_counts: AtomMap<u32>,
    tracks: [Vec<usize>; N_TRACKS],
    skip_depth: usize,
    attr_skip_depth: usize,
    pre_depth: usize,
    sectioning_depth: usize,
    foreign_depth: usize,
    /// Stack index of the outermost open `<svg>`/`<math>`.
    foreign_start: Option<usize>,
    heading: Option<HeadingState>,
    /// Inside a raw-text element whose content is dropped (script, style...): until its end tag.
    raw_ignore: bool,
    /// Inside the first `<title>`.
    in_title: bool,
    title_buf: String,
    /// The text block being collected.
    buf: String,
    buf_pre: bool,
    pending_space: bool,
    blocks: Vec<Block>,
    title: Option<String>,
    flattened: bool,
    kept_bytes: usize,
    attr_dropped_bytes: usize,
}

impl<'a> State<'a> {
    fn new(ex: &'a Extractor, attribute_rules: bool) -> Self {
        State {
            ex,
            attribute_rules,
            stack: Vec::new(),
            open_counts: AtomMap::default(),
            tracks: Default::default(),
            skip_depth: 0,
            attr_skip_depth: 0,
            pre_depth: 0,
            sectioning_depth: 0,
            foreign_depth: 0,
            foreign_start: None,
            heading: None,
            raw_ignore: false,
            in_title: false,
            title_buf: String::new(),
            buf: String::new(),
            buf_pre: false,
            pending_space: false,
            blocks: Vec::new(),
            title: None,
            flattened: false,
            kept_bytes: 0,
            attr_dropped_bytes: 0,
        }
    }

    fn last(&self, t: Track) -> Option<usize> {
        self.tracks[t as usize].last().copied()
    }

    /// Pops to (and including) the innermost open element of kind `t` if no boundary kind is open
    /// inside it.
    fn close_in_scope(&mut self, t: Track, boundaries: &[Track]) {
        if let Some(i) = self.last(t) {
            let blocked = boundaries
                .iter()
                .any(|&b| self.last(b).is_some_and(|j| j > i));
            if !blocked {
                self.pop_to(i);
            }
        }
    }

    fn pop_to(&mut self, index: usize) {
        while self.stack.len() > index {
            self.pop_frame();
        }
    }

    fn pop_frame(&mut self) {
        let Some(frame) = self.stack.pop() else {
            return;
        };
        let index = self.stack.len();
        if let Some(c) = self.open_counts.get_mut(&frame.name) {
            *c = c.saturating_sub(1);
        }
        for t in 0..N_TRACKS {
            if frame.tracks & (1 << t) != 0 {
                self.tracks[t].pop();
            }
        }
        if frame.heading > 0 && self.heading.as_ref().is_some_and(|h| h.index == index) {
            self.emit_heading();
        }
        if frame.flags & PRE != 0 {
            self.pre_depth = self.pre_depth.saturating_sub(1);
        }
        if frame.flags & BLOCK != 0 {
            self.flush();
        }
        if frame.flags & SECTIONING != 0 {
            self.sectioning_depth = self.sectioning_depth.saturating_sub(1);
        }
        if frame.flags & FOREIGN != 0 {
            self.foreign_depth = self.foreign_depth.saturating_sub(1);
            if self.foreign_depth == 0 {
                self.foreign_start = None;
            }
        }
        if let Some(by_attr) = frame.skip {
            self.skip_depth = self.skip_depth.saturating_sub(1);
            if by_attr {
                self.attr_skip_depth = self.attr_skip_depth.saturating_sub(1);
            }
        }
    }

    fn emit_heading(&mut self) {
        if let Some(h) = self.heading.take() {
            // Permalink markers that survived the class rules: "Title¶", "Title #" (not "C#").
            let mut text = h
                .text
                .trim_end_matches(|c: char| c == '¶' || c == '§' || c.is_whitespace());
            if let Some(t) = text.strip_suffix(" #") {
                text = t.trim_end();
            }
            let text = text.to_string();
            self.blocks.push(Block::Heading {
                level: h.level,
                text,
            });
        }
    }

    /// Ends the current text block.
    fn flush(&mut self) {
        if !self.buf.is_empty() {
            let text = if self.buf_pre {
                let t = self.buf.trim_end();
                let t = t.trim_start_matches(['\n', '\r']);
                t.to_string()
            } else {
                self.buf.clone()
            };
            if !text.trim().is_empty() {
                self.blocks.push(Block::Text(text));
            }
            self.buf.clear();
        }
        self.buf_pre = false;
        self.pending_space = false;
    }

    fn text(&mut self, s: &str) {
        if self.raw_ignore {
            return;
        }
        if self.in_title {
            self.title_buf.push_str(s);
            return;
        }
        if self.skip_depth > 0 {
            if self.attr_skip_depth > 0 {
                self.attr_dropped_bytes += s.trim().len();
            }
            return;
        }
        self.kept_bytes += s.trim().len();
        if let Some(h) = self.heading.as_mut() {
            push_collapsed(&mut h.text, &mut h.pending, s);
        } else if self.pre_depth > 0 {
            if self.buf.is_empty() {
                self.buf_pre = true;
            } else if !self.buf_pre {
                // Inline text before a <pre> opened without a block boundary: keep the words apart.
                self.buf.push(' ');
            }
            self.buf.push_str(s);
        } else {
            push_collapsed(&mut self.buf, &mut self.pending_space, s);
        }
    }

    fn line_break(&mut self) {
        if self.skip_depth > 0 || self.raw_ignore || self.in_title {
            return;
        }
        if let Some(h) = self.heading.as_mut() {
            h.pending = true;
        } else if self.pre_depth > 0 {
            self.buf.push('\n');
            self.buf_pre = true;
        } else {
            self.pending_space = true;
        }
    }

    /// Whether the element's attributes mark it as boilerplate.
    fn attributes_skip(&self, tag: &Tag, info: &TagInfo) -> bool {
        if tag.attrs.is_empty() {
            return false;
        }
        let is_main = tag.attrs.iter().any(|a| {
            a.name.local == local_name!("role") && a.value.trim().eq_ignore_ascii_case("main")
        });
        if is_main || info.flags & KEEP != 0 {
            return false;
        }
        let is_section = &*tag.name == "section";
        for attr in &tag.attrs {
            let local = &attr.name.local;
            if *local == local_name!("hidden") {
                return true;
            }
            if !self.attribute_rules {
                continue;
            }
            if *local == local_name!("class") {
                if attr
                    .value
                    .split_ascii_whitespace()
                    .any(|token| self.token_matches(token, usize::MAX))
                {
                    return true;
                }
            } else if *local == local_name!("id") {
                if !is_section && self.token_matches(attr.value.trim(), 2) {
                    return true;
                }
            } else if *local == local_name!("role")
                && attr
                    .value
                    .split_ascii_whitespace()
                    .any(|r| self.contains_lower(&self.ex.roles, r))
            {
                return true;
            }
        }
        false
    }

    fn contains_lower(&self, set: &HashSet<String>, s: &str) -> bool {
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            set.contains(&s.to_ascii_lowercase())
        } else {
            set.contains(s)
        }
    }

    /// A class token (or id) made of at most `max_parts` `-`/`_` parts, one of which is a skip word,
    /// and whose first part is not a state prefix.
    fn token_matches(&self, token: &str, max_parts: usize) -> bool {
        if token.is_empty() {
            return false;
        }
        let mut parts = token.split(['-', '_']).filter(|p| !p.is_empty());
        let Some(first) = parts.next() else {
            return false;
        };
        if self.contains_lower(&self.ex.state_prefixes, first) {
            return false;
        }
        if max_parts != usize::MAX
            && token.split(['-', '_']).filter(|p| !p.is_empty()).count() > max_parts
        {
            return false;
        }
        std::iter::once(first)
            .chain(parts)
            .any(|p| self.contains_lower(&self.ex.class_words, p))
    }

    fn start_tag(&mut self, tag: Tag) -> TokenSinkResult<()> {
        let info = classify(&tag.name);

        if let Some(raw) = info.raw {
            if self.foreign_depth == 0 {
                return self.start_raw(&tag, &info, raw);
            }
        }
        if info.flags & VOID != 0 {
            if info.flags & BR != 0 {
                self.line_break();
            } else if info.flags & BLOCK != 0 {
                if info.flags & CLOSES_P != 0 {
                    self.close_in_scope(Track::P, &[Track::Scope]);
                }
                self.flush();
            }
            return TokenSinkResult::Continue;
        }
        if info.flags & NOPUSH != 0 {
            self.flush();
            return TokenSinkResult::Continue;
        }

        // An HTML element inside an unclosed <svg>/<math> ends the foreign content, as in browsers
        // (otherwise one unclosed icon would swallow the rest of the page).
        if self.foreign_depth > 0 && breaks_out_of_foreign(&tag.name) {
            if let Some(start) = self.foreign_start {
                self.pop_to(start);
            }
        }

        // Implicit closes (HTML standard, "in body" insertion mode, simplified).
        if info.flags & CLOSES_P != 0 {
            self.close_in_scope(Track::P, &[Track::Scope]);
        }
        if info.tracks & bit(Track::Li) != 0 {
            self.close_in_scope(Track::Li, &[Track::List, Track::Scope]);
        }
        if info.tracks & bit(Track::DtDd) != 0 {
            self.close_in_scope(Track::DtDd, &[Track::Dl, Track::Scope]);
        }
        if info.tracks & bit(Track::Cell) != 0 {
            self.close_in_scope(Track::Cell, &[Track::Table]);
        }
        if info.tracks & bit(Track::Row) != 0 {
            self.close_in_scope(Track::Row, &[Track::Table]);
        }
        if info.tracks & bit(Track::TSection) != 0 {
            self.close_in_scope(Track::Row, &[Track::Table]);
            self.close_in_scope(Track::TSection, &[Track::Table]);
        }
        if info.tracks & bit(Track::A) != 0 {
            self.close_in_scope(Track::A, &[Track::Scope]);
        }
        if info.heading > 0 {
            if let Some(index) = self.heading.as_ref().map(|h| h.index) {
                self.pop_to(index);
            }
        }

        let skip = if self.skip_depth > 0 {
            // Already inside removed content: no need to look at attributes.
            None
        } else if info.flags & SKIP != 0
            || (info.flags & HEADER_ELEMENT != 0 && self.sectioning_depth == 0)
        {
            Some(false)
        } else if self.attributes_skip(&tag, &info) {
            Some(true)
        } else {
            None
        };

        if info.flags & BLOCK != 0 || info.heading > 0 {
            self.flush();
        }
        if self.stack.len() >= self.ex.max_depth {
            self.flattened = true;
            return TokenSinkResult::Continue;
        }

        let index = self.stack.len();
        if let Some(by_attr) = skip {
            self.skip_depth += 1;
            if by_attr {
                self.attr_skip_depth += 1;
            }
        }
        if info.heading > 0 && self.skip_depth == 0 {
            self.heading = Some(HeadingState {
                level: info.heading,
                index,
                text: String::new(),
                pending: false,
            });
        }
        if info.flags & PRE != 0 {
            self.pre_depth += 1;
        }
        if info.flags & SECTIONING != 0 {
            self.sectioning_depth += 1;
        }
        if info.flags & FOREIGN != 0 {
            if self.foreign_depth == 0 {
                self.foreign_start = Some(index);
            }
            self.foreign_depth += 1;
        }
        for t in 0..N_TRACKS {
            if info.tracks & (1 << t) != 0 {
                self.tracks[t].push(index);
            }
        }
        *self.open_counts.entry(tag.name.clone()).or_insert(0) += 1;
        self.stack.push(Frame {
            name: tag.name,
            flags: info.flags,
            tracks: info.tracks,
            heading: info.heading,
            skip,
        });
        // In SVG/MathML, `<x/>` really is empty; in HTML the slash is ignored.
        if tag.self_closing && self.foreign_depth > 0 {
            self.pop_frame();
        }
        TokenSinkResult::Continue
    }

    fn start_raw(&mut self, tag: &Tag, info: &TagInfo, raw: Raw) -> TokenSinkResult<()> {
        match raw {
            Raw::Plaintext => {
                self.close_in_scope(Track::P, &[Track::Scope]);
                self.flush();
                // Everything after is text: treat it as preformatted, never popped.
                self.pre_depth += 1;
                TokenSinkResult::Plaintext
            }
            Raw::Rcdata if &*tag.name == "title" => {
                if self.title.is_none() && self.skip_depth == 0 {
                    self.in_title = true;
                    self.title_buf.clear();
                } else {
                    self.raw_ignore = true;
                }
                TokenSinkResult::RawData(RawKind::Rcdata)
            }
            _ => {
                if info.flags & BLOCK != 0 {
                    self.close_in_scope(Track::P, &[Track::Scope]);
                    self.flush();
                }
                self.raw_ignore = true;
                TokenSinkResult::RawData(match raw {
                    Raw::Script => RawKind::ScriptData,
                    Raw::Rcdata => RawKind::Rcdata,
                    _ => RawKind::Rawtext,
                })
            }
        }
    }

    fn end_tag(&mut self, tag: Tag) {
        if self.raw_ignore || self.in_title {
            // In a raw-text state the tokenizer only emits the matching end tag.
            if self.in_title {
                self.finish_title();
            }
            self.raw_ignore = false;
            return;
        }
        let info = classify(&tag.name);
        if info.flags & BR != 0 {
            // `</br>` is a line break, as in browsers.
            self.line_break();
            return;
        }
        if info.flags & NOPUSH != 0 {
            self.flush();
            return;
        }
        let open = self.open_counts.get(&tag.name).copied().unwrap_or(0);
        if open == 0 {
            // Not open (stray, or opened beyond the depth cap): a block boundary at most.
            if info.flags & BLOCK != 0 && self.skip_depth == 0 {
                self.flush();
            }
            return;
        }
        while let Some(frame) = self.stack.last() {
            let found = frame.name == tag.name;
            self.pop_frame();
            if found {
                break;
            }
        }
    }

    fn finish_title(&mut self) {
        self.in_title = false;
        let t = collapse_whitespace(&self.title_buf);
        if !t.is_empty() {
            self.title = Some(t);
        }
        self.title_buf.clear();
    }

    fn finish(&mut self) {
        if self.in_title {
            self.finish_title();
        }
        self.pop_to(0);
        self.emit_heading();
        self.flush();
    }
}

struct Sink<'a> {
    state: RefCell<State<'a>>,
}

impl TokenSink for Sink<'_> {
    type Handle = ();

    fn process_token(&self, token: Token, _line: u64) -> TokenSinkResult<()> {
        let mut state = self.state.borrow_mut();
        match token {
            Token::CharacterTokens(t) => state.text(&t),
            Token::TagToken(tag) => match tag.kind {
                TagKind::StartTag => return state.start_tag(tag),
                TagKind::EndTag => state.end_tag(tag),
            },
            Token::NullCharacterToken
            | Token::CommentToken(_)
            | Token::DoctypeToken(_)
            | Token::ParseError(_)
            | Token::EOFToken => {}
        }
        TokenSinkResult::Continue
    }

    fn adjusted_current_node_present_but_not_in_html_namespace(&self) -> bool {
        // Lets the tokenizer read `<![CDATA[...]]>` inside SVG/MathML as text, as browsers do.
        self.state.borrow().foreign_depth > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(html: &str) -> ExtractedPage {
        extract(html, &ExtractOptions::default())
    }

    fn texts(page: &ExtractedPage) -> Vec<String> {
        page.blocks
            .iter()
            .map(|b| match b {
                Block::Heading { level, text } => format!("h{level}:{text}"),
                Block::Text(t) => t.clone(),
            })
            .collect()
    }

    #[test]
    fn headers_blocks_and_whitespace() {
        let p = ex("<html><head><title> My\n Page </title></head><body>\
            <h1>Top  <a class=headerlink href=#x>¶</a></h1><p>Hello   <b>big</b>\n world &amp; co</p>\
            <ul><li>one<li>two</ul><pre>\n  a\n    b\n</pre><div>loose <span>text</span></div></body>");
        assert_eq!(p.title.as_deref(), Some("My Page"));
        assert_eq!(
            texts(&p),
            vec![
                "h1:Top",
                "Hello big world & co",
                "one",
                "two",
                "  a\n    b",
                "loose text"
            ]
        );
        assert!(!p.flattened_depth);
    }

    #[test]
    fn boilerplate_removed() {
        let p = ex(
            "<body><nav><p>menu</p></nav><header><p>site banner</p></header>\
            <script>var x = '<p>no</p>';</script><style>p{}</style>\
            <div class=\"main-nav\"><p>links</p></div><div role=navigation>more links</div>\
            <article><header><h1>Title</h1></header><p>Body text.</p></article>\
            <div class=\"has-sidebar\"><p>kept</p></div><footer>foot</footer>\
            <form><p>search</p></form><p>after <button>Click</button>end</p></body>",
        );
        assert_eq!(
            texts(&p),
            vec!["h1:Title", "Body text.", "kept", "after end"]
        );
    }

    #[test]
    fn class_words_match_whole_parts_only() {
        let p = ex(
            "<div class=canvas-holder><p>a</p></div><div class=unavailable><p>b</p></div>\
            <div class=sidebar-left><p>c</p></div><div id=cookie-objects-and-more><p>d</p></div>",
        );
        assert_eq!(texts(&p), vec!["a", "b", "d"]);
    }

    #[test]
    fn attribute_rules_fall_back_when_they_remove_everything() {
        let body = "Real content. ".repeat(100);
        let html =
            format!("<body><div class=\"layout nav-wrapper\"><p>{body}</p></div><p>x</p></body>");
        let p = ex(&html);
        assert_eq!(p.blocks.len(), 2, "{:?}", p.blocks);
    }

    #[test]
    fn implicit_closes() {
        let p = ex(
            "<p>one<p>two<div>three</div><table><tr><td>a<td>b<tr><td>c</table>\
            <dl><dt>term<dd>def</dl><h2>A<h3>B</h3>",
        );
        assert_eq!(
            texts(&p),
            vec!["one", "two", "three", "a", "b", "c", "term", "def", "h2:A", "h3:B"]
        );
    }

    #[test]
    fn deep_nesting_is_flattened_and_linear() {
        let n = 100_000;
        let html = format!("{}deep text{}", "<div>".repeat(n), "</div>".repeat(n));
        let p = ex(&html);
        assert_eq!(texts(&p), vec!["deep text"]);
        assert!(p.flattened_depth);
        let html = format!(
            "{}inline{}<p>after</p>",
            "<span>".repeat(n),
            "</i>".repeat(n)
        );
        let p = ex(&html);
        assert_eq!(texts(&p), vec!["inline", "after"]);
    }

    #[test]
    fn entities_cdata_and_unterminated_input() {
        let p = ex(
            "<p>&lt;tag&gt; &eacute;t&eacute; &#x263A; &nbsp;x</p><svg><![CDATA[junk]]></svg>\
            <h2>unterminated",
        );
        assert_eq!(texts(&p), vec!["<tag> été ☺ x", "h2:unterminated"]);
        let p = ex("<title>never closed");
        assert_eq!(p.title.as_deref(), Some("never closed"));
        let p = ex("<p>a <script>if (a < b) {</p>");
        assert_eq!(texts(&p), vec!["a"]);
    }

    #[test]
    fn unclosed_svg_does_not_swallow_the_page() {
        let p = ex("<p>a<svg><path d=x/><title>icon</title><p>b</p><h2>C#</h2>");
        assert_eq!(texts(&p), vec!["a", "b", "h2:C#"]);
    }

    #[test]
    fn plain_text_pages() {
        let p = ExtractedPage::from_plain_text("para one\ncontinues\n\npara two\n");
        assert_eq!(texts(&p), vec!["para one continues", "para two"]);
        let p = ExtractedPage::from_plain_text("line one\nline two");
        assert_eq!(texts(&p), vec!["line one", "line two"]);
    }
}
