//! Extraction, segmentation, charsets and MinHash on real pages and real bytes.
//!
//! The expected header paths and passage starts below were read off the HTML of the Python 3.11
//! documentation (Debian `python3.11-doc`, cached by scripts/fetch-assets.sh) by hand. Tests that
//! need the cache print a message and pass when it is absent.

use backflow::records::Block;
use backflow::stats::DropReason;
use backflow::text::charset::{decode_html, CharsetSource};
use backflow::text::html::{extract, ExtractOptions, ExtractedPage};
use backflow::text::minhash::{estimated_jaccard, exact_jaccard, MinHasher};
use backflow::text::segment::{segment, SegmentOptions, SegmentOutcome};
use encoding_rs::{SHIFT_JIS, UTF_8, WINDOWS_1252};
use std::path::PathBuf;

fn page_path(rel: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home)
        .join(".cache/backflow/pages/python3.11")
        .join(rel);
    if p.is_file() {
        Some(p)
    } else {
        println!(
            "skipping: {} not cached (run scripts/fetch-assets.sh)",
            p.display()
        );
        None
    }
}

fn load(rel: &str) -> Option<(ExtractedPage, SegmentOutcome)> {
    let bytes = std::fs::read(page_path(rel)?).ok()?;
    let decoded = decode_html(&bytes, None);
    let page = extract(&decoded.text, &ExtractOptions::default());
    let out = segment(&page, &SegmentOptions::default());
    Some((page, out))
}

fn all_text(page: &ExtractedPage) -> Vec<&str> {
    page.blocks
        .iter()
        .map(|b| match b {
            Block::Heading { text, .. } | Block::Text(text) => text.as_str(),
        })
        .collect()
}

/// The Sphinx chrome around every page of the Python docs: sidebars, relbars, footer.
fn assert_no_sphinx_boilerplate(page: &ExtractedPage) {
    for text in all_text(page) {
        for junk in [
            "Table of Contents",
            "Previous topic",
            "Next topic",
            "This Page",
            "Report a Bug",
            "Show Source",
            "Quick search",
            "Navigation",
            "Please donate",
            "Python Software Foundation is a non-profit",
            "Created using",
            "Permalink",
        ] {
            assert!(
                !text.contains(junk),
                "boilerplate {junk:?} in block {text:?}"
            );
        }
        assert!(!text.ends_with('¶'), "headerlink left in {text:?}");
    }
}

fn paths(out: &SegmentOutcome) -> Vec<Vec<&str>> {
    out.segments
        .iter()
        .map(|s| s.header_path.iter().map(String::as_str).collect())
        .collect()
}

#[test]
fn controlflow_page() {
    let Some((page, out)) = load("tutorial/controlflow.html") else {
        return;
    };
    assert_eq!(
        page.title.as_deref(),
        Some("4. More Control Flow Tools — Python 3.11.2 documentation")
    );
    assert_no_sphinx_boilerplate(&page);
    // The sidebar repeats every header as a link: there must be exactly one h1 and the headers
    // must start as in the body.
    let headings: Vec<(u8, &str)> = page
        .blocks
        .iter()
        .filter_map(|b| match b {
            Block::Heading { level, text } => Some((*level, text.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(headings.iter().filter(|h| h.0 == 1).count(), 1);
    assert_eq!(
        &headings[..4],
        &[
            (1, "4. More Control Flow Tools"),
            (2, "4.1. if Statements"),
            (2, "4.2. for Statements"),
            (2, "4.3. The range() Function"),
        ]
    );
    assert!(headings.contains(&(4, "4.8.3.4. Function Examples")));

    // The h1 subtree is far over 3000 chars: it is split at its h2s; its own lead (one sentence,
    // "Besides the while statement ...") is too short on its own.
    assert!(out.drops.iter().any(|(r, d)| *r == DropReason::TooShort
        && d.starts_with("4. More Control Flow Tools: own text")));
    let p = paths(&out);
    assert_eq!(
        p[0],
        vec!["4. More Control Flow Tools", "4.1. if Statements"]
    );
    assert!(out.segments[0].text.starts_with(
        "4.1. if Statements\n\nPerhaps the most well-known statement type is the if statement. \
         For example:\n\n>>> x = int(input(\"Please enter an integer: \"))\nPlease enter an integer: 42\n"
    ));
    // 4.5 is short but over 600 chars with its example: one passage.
    let pass = out
        .segments
        .iter()
        .find(|s| s.header_path.last().map(String::as_str) == Some("4.5. pass Statements"))
        .expect("4.5 pass Statements passage");
    assert!(pass.text.starts_with(
        "4.5. pass Statements\n\nThe pass statement does nothing. It can be used when a statement is required syntactically"
    ));
    // 4.8 is split into its h3s; 4.8.3.4 is a level-4 passage under 4.8.3.
    assert!(p.contains(&vec![
        "4. More Control Flow Tools",
        "4.8. More on Defining Functions",
        "4.8.1. Default Argument Values"
    ]));
    assert!(p.contains(&vec![
        "4. More Control Flow Tools",
        "4.8. More on Defining Functions",
        "4.8.3. Special parameters",
        "4.8.3.4. Function Examples"
    ]));
    for s in &out.segments {
        let n = s.text.chars().count();
        assert!((600..=3000).contains(&n), "{:?}: {n} chars", s.header_path);
        assert!(s
            .text
            .starts_with(s.header_path.last().map_or("", String::as_str)));
    }
}

#[test]
fn json_page() {
    let Some((page, out)) = load("library/json.html") else {
        return;
    };
    assert_no_sphinx_boilerplate(&page);
    let p = paths(&out);
    // The module's lead (before "Basic Usage") is longer than 3000 chars and has no sub-header:
    // it is packed into passages headed by the h1 line.
    assert_eq!(p[0], vec!["json — JSON encoder and decoder"]);
    assert!(out.segments[0].text.starts_with(
        "json — JSON encoder and decoder\n\nSource code: Lib/json/__init__.py\n\n\
         JSON (JavaScript Object Notation), specified by RFC 7159"
    ));
    // API signatures (dt) are text blocks, spans joined without spurious spaces.
    assert!(all_text(&page).iter().any(|t| t.starts_with(
        "json.dump(obj, fp, *, skipkeys=False, ensure_ascii=True, check_circular=True"
    )));
    // "Command Line Interface" (h2) fits with its h3 "Command line options": one passage holding
    // the sub-header as a line.
    let cli = out
        .segments
        .iter()
        .find(|s| s.header_path == ["json — JSON encoder and decoder", "Command Line Interface"])
        .expect("Command Line Interface passage");
    assert!(cli
        .text
        .starts_with("Command Line Interface\n\nSource code: Lib/json/tool.py"));
    assert!(cli.text.contains("\n\nCommand line options\n\n"));
    // "Exceptions" holds only JSONDecodeError and its attributes: under 600 chars.
    assert!(out.drops.iter().any(|(r, d)| *r == DropReason::TooShort
        && d.starts_with("json — JSON encoder and decoder > Exceptions")));
}

#[test]
fn faq_page() {
    let Some((page, out)) = load("faq/general.html") else {
        return;
    };
    assert_no_sphinx_boilerplate(&page);
    // The page's own "Contents" box is a <nav class="contents">: removed.
    assert!(!all_text(&page).contains(&"Contents"));
    // Header text sits inside <a class="toc-backref">: it must survive.
    let p = paths(&out);
    assert_eq!(
        p[0],
        vec![
            "General Python FAQ",
            "General Information",
            "What is Python?"
        ]
    );
    assert!(out.segments[0].text.starts_with(
        "What is Python?\n\nPython is an interpreted, interactive, object-oriented programming language. \
         It incorporates modules, exceptions, dynamic typing"
    ));
}

#[test]
fn latin1_page_declared_utf8_is_detected() {
    // French text in latin-1 (é = 0xE9, É = 0xC9, ï = 0xEF) behind a meta that says UTF-8.
    let bytes: &[u8] = b"<html><head><meta charset=\"utf-8\"><title>Caf\xe9</title></head><body>\
        <p>\xc9l\xe9onore a command\xe9 un caf\xe9 tr\xe8s na\xefvement \xe0 la terrasse, \
        pr\xe8s de la for\xeat o\xf9 l'on \xe9tait all\xe9s l'\xe9t\xe9 dernier.</p></body></html>";
    let d = decode_html(bytes, None);
    assert_eq!(d.source, CharsetSource::Detected);
    assert_eq!(d.rejected, Some((UTF_8, CharsetSource::MetaTag)));
    assert!(!d.had_errors);
    assert!(
        d.text
            .contains("Éléonore a commandé un café très naïvement à la terrasse"),
        "{}",
        d.text
    );
    let page = extract(&d.text, &ExtractOptions::default());
    assert_eq!(page.title.as_deref(), Some("Café"));
}

#[test]
fn windows_1252_page_without_declaration_is_detected() {
    // Smart quotes (0x93/0x94), euro (0x80), en dash (0x96): windows-1252 only, no declaration.
    let bytes: &[u8] = b"<html><body><p>\x93Quoted text\x94 costs \x80 5 \x96 the caf\xe9 \
        serves cr\xe8me br\xfbl\xe9e and the price is \x93reasonable\x94 for everyone who \
        visits the place in the evening.</p></body></html>";
    let d = decode_html(bytes, None);
    assert_eq!(d.source, CharsetSource::Detected);
    assert_eq!(d.encoding, WINDOWS_1252);
    assert!(d.rejected.is_none());
    assert!(d
        .text
        .contains("“Quoted text” costs € 5 – the café serves crème brûlée"));
}

#[test]
fn shift_jis_declared_in_meta() {
    // "日本語のテキストです。" in Shift_JIS (bytes from Python's codec).
    let mut bytes = b"<html><head><meta http-equiv=\"Content-Type\" content=\"text/html; charset=Shift_JIS\"></head><body><h1>".to_vec();
    bytes.extend_from_slice(
        b"\x93\xfa\x96{\x8c\xea\x82\xcc\x83e\x83L\x83X\x83g\x82\xc5\x82\xb7\x81B",
    );
    bytes.extend_from_slice(b"</h1></body></html>");
    let d = decode_html(&bytes, None);
    assert_eq!(d.source, CharsetSource::MetaTag);
    assert_eq!(d.encoding, SHIFT_JIS);
    let page = extract(&d.text, &ExtractOptions::default());
    assert_eq!(
        page.blocks,
        vec![Block::Heading {
            level: 1,
            text: "日本語のテキストです。".into()
        }]
    );
    // The HTTP header wins over the meta.
    let d = decode_html(
        b"<meta charset=shift_jis><p>caf\xe9",
        Some("text/html; charset=windows-1252"),
    );
    assert_eq!(d.source, CharsetSource::HttpHeader);
    assert!(d.text.ends_with("café"));
}

#[test]
fn deeply_nested_html_is_linear_and_correct() {
    let n = 100_000;
    let mut html = String::from("<html><body><h2>Deep</h2>");
    for i in 0..n {
        html.push_str(if i % 3 == 0 {
            "<div>"
        } else if i % 3 == 1 {
            "<section>"
        } else {
            "<span>"
        });
        if i == 10 {
            html.push_str("<p>shallow text</p>");
        }
    }
    html.push_str("deep &amp; text");
    for i in (0..n).rev() {
        html.push_str(if i % 3 == 0 {
            "</div>"
        } else if i % 3 == 1 {
            "</section>"
        } else {
            "</span>"
        });
    }
    html.push_str("<p>after</p></body></html>");
    let started = std::time::Instant::now();
    let page = extract(&html, &ExtractOptions::default());
    println!("100k-deep page extracted in {:?}", started.elapsed());
    assert!(page.flattened_depth);
    assert_eq!(
        page.blocks,
        vec![
            Block::Heading {
                level: 2,
                text: "Deep".into()
            },
            Block::Text("shallow text".into()),
            Block::Text("deep & text".into()),
            Block::Text("after".into()),
        ]
    );
    // 100k unclosed <p>s (each closes the last) and 100k unclosed <li>s.
    let html = format!("{}{}", "<p>x".repeat(n), "<ul><li>y".repeat(1000));
    let page = extract(&html, &ExtractOptions::default());
    assert_eq!(page.blocks.len(), n + 1000);
}

#[test]
fn repetitive_page_section_is_dropped() {
    let spam = "<p>Best cheap watches for sale online, buy now and save big today.</p>".repeat(15);
    let good = "<p>The hour hand of a mechanical watch is driven through a reduction gear train \
        from the minute wheel, which itself turns once an hour. Because the gear ratio is fixed \
        at twelve to one, any wear in the motion works shows up as play between the hands rather \
        than as a timekeeping error, and a watchmaker checks it by moving the crown gently.</p>";
    let more = "<p>Regulating a balance wheel means adjusting its effective length of hairspring: \
        moving the regulator pins toward the stud shortens the active spring, raising the rate. \
        Temperature changes the elasticity of the spring as well, which is why modern alloys \
        were developed to keep the rate stable from winter mornings to summer afternoons.</p>";
    let html = format!("<h2>Watches on sale</h2>{spam}<h2>How the hands move</h2>{good}{more}");
    let page = extract(&html, &ExtractOptions::default());
    let out = segment(&page, &SegmentOptions::default());
    assert_eq!(out.segments.len(), 1, "{:?}", out.drops);
    assert_eq!(out.segments[0].header_path, vec!["How the hands move"]);
    assert_eq!(out.drops.len(), 1);
    assert_eq!(out.drops[0].0, DropReason::Repetitive);
    assert!(out.drops[0].1.starts_with("Watches on sale"));
}

/// `n` distinct words `t0 t1 ...` with an offset, so that texts can share exactly chosen words.
fn words(range: std::ops::Range<usize>, prefix: &str) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

#[test]
fn minhash_estimate_tracks_exact_jaccard() {
    let hasher = MinHasher::default();
    // A = 200 distinct words; B = A's first m words followed by 200 - m new ones. With 5-word
    // shingles each text has 196 shingles; they share those inside the common prefix: m - 4.
    // Exact Jaccard = (m - 4) / (2 * 196 - (m - 4)), computed here by hand, not by the library.
    let mut total_err = 0.0;
    for &m in &[40usize, 100, 160, 190] {
        let a = words(0..200, "t").join(" ");
        let mut b_words = words(0..m, "t");
        b_words.extend(words(m..200, "u"));
        let b = b_words.join(" ");
        let shared = (m - 4) as f64;
        let expected = shared / (2.0 * 196.0 - shared);
        let exact = exact_jaccard(&a, &b, 5);
        assert!(
            (exact - expected).abs() < 1e-12,
            "m={m}: {exact} vs {expected}"
        );
        let est = estimated_jaccard(&hasher.signature(&a), &hasher.signature(&b));
        // 112 permutations: standard error <= 0.05; allow 3 sigma.
        assert!(
            (est - expected).abs() < 0.15,
            "m={m}: est {est} vs {expected}"
        );
        total_err += (est - expected).abs();
    }
    assert!(total_err / 4.0 < 0.08, "mean error {}", total_err / 4.0);
    // Identical texts: identical signatures.
    let a = words(0..50, "t").join(" ");
    assert_eq!(
        estimated_jaccard(&hasher.signature(&a), &hasher.signature(&a)),
        1.0
    );
}

#[test]
fn near_duplicate_shares_a_band_unrelated_does_not() {
    let hasher = MinHasher::default();
    let base =
        "Regulating a balance wheel means adjusting the effective length of its hairspring. \
        Moving the regulator pins toward the stud shortens the active spring and raises the rate, \
        while moving them away lowers it. Temperature changes the elasticity of the spring as \
        well, which is why modern alloys were developed to keep the rate stable from cold winter \
        mornings to warm summer afternoons. A watchmaker observes the rate in several positions, \
        dial up, dial down and crown in three directions, because gravity acts on an imperfectly \
        poised balance differently in each. The differences between these positions tell more \
        about the health of the movement than the average rate does. After cleaning, the \
        mainspring is replaced if it has set, the pivots are polished, and the jewels are oiled \
        with a tiny amount of oil so that it stays in place by capillary action. Too much oil \
        spreads and attracts dust; too little leaves the steel pivots to wear against the stones. \
        Finally the amplitude is measured, since a low amplitude after service points to a \
        problem in the gear train or to a tired mainspring that should have been replaced. \
        The case is then closed with a new gasket, tested for water resistance under pressure, \
        and left to run on a winder for several days while its rate is recorded each morning. \
        Only when the daily rate stays within a few seconds, in every position, is the watch \
        returned to its owner with a note describing the work that was done on it.";
    assert!((1400..1700).contains(&base.len()), "{}", base.len());
    let near = base.replacen("tired mainspring", "weak mainspring", 1);
    assert_ne!(near, base);
    let unrelated = "The Python json module exposes an API familiar to users of the standard \
        library marshal and pickle modules. It can serialize dictionaries, lists, strings, \
        numbers, booleans and None, and with a custom encoder also other objects. Decoding \
        accepts any valid JSON document and maps objects to dictionaries by default. Options \
        control indentation, separators and key sorting, which matters for reproducible output \
        in tests and in files that are kept under version control. Large integers and floating \
        point numbers are handled without loss where the platform allows it.";
    let keys = |t: &str| hasher.band_keys(&hasher.signature(t));
    let (kb, kn, ku) = (keys(base), keys(&near), keys(unrelated));
    assert_eq!(kb.len(), 14);
    let shared = |a: &[u64], b: &[u64]| a.iter().zip(b).filter(|(x, y)| x == y).count();
    assert!(shared(&kb, &kn) >= 1, "near-duplicate shares no band");
    assert_eq!(shared(&kb, &ku), 0);
    assert!(exact_jaccard(base, &near, 5) > 0.9);
}
