//! Parquet reader: one record per row, the text from a string column (`text` unless
//! configured), `url` and `id` when the file has them (FineWeb, FineWeb-Edu and RefinedWeb ship
//! this shape).
//!
//! Only the text, url and id columns are decoded (a projection: FineWeb's other columns are
//! never read), one row group at a time, so memory stays bounded by a row group's text whatever
//! the file's size. A record's offset is its row number in the file; its id, when the file has
//! none, is `<file>@<row>`. Progress counts the compressed bytes of the row groups begun, so an
//! epoch cut every N bytes falls on row group boundaries.

use std::sync::Arc;

use ::parquet::file::reader::{ChunkReader, FileReader, SerializedFileReader};
use ::parquet::record::reader::RowIter;
use ::parquet::record::Field;
use ::parquet::schema::types::Type;

use super::{derived_id, ReadOptions};
use crate::records::{Body, Origin, RawRecord};
use crate::stats::{Drop, DropReason};

/// The rows of one Parquet file as records.
pub struct ParquetReader {
    file: String,
    text_field: String,
    max_text: u64,
    rows: Option<RowIter<'static>>,
    /// Rows in each row group, and its compressed bytes.
    groups: Vec<(u64, u64)>,
    /// The next row's number.
    row: u64,
    /// A drop to give before anything else (a file that cannot be read, a missing column).
    pending: Option<Drop>,
}

impl ParquetReader {
    /// Opens `file` (a local file, or a [`super::remote::ParquetSource`]; named `name` in
    /// origins), reading the text column `opts.text_field`.
    pub fn new<R: ChunkReader + 'static>(
        file: R,
        name: impl Into<String>,
        opts: &ReadOptions,
    ) -> Self {
        let name = name.into();
        let mut reader = ParquetReader {
            file: name.clone(),
            text_field: opts.text_field.clone(),
            max_text: opts.max_page_bytes,
            rows: None,
            groups: Vec::new(),
            row: 0,
            pending: None,
        };
        let drop = |reason, detail: String| Drop {
            reason,
            file: name.clone(),
            offset: 0,
            detail,
        };
        let parsed = match SerializedFileReader::new(file) {
            Ok(r) => r,
            Err(e) => {
                reader.pending = Some(drop(DropReason::UnreadableFile, e.to_string()));
                return reader;
            }
        };
        let meta = parsed.metadata();
        reader.groups = meta
            .row_groups()
            .iter()
            .map(|g| {
                (
                    g.num_rows().max(0) as u64,
                    g.compressed_size().max(0) as u64,
                )
            })
            .collect();
        let schema = meta.file_metadata().schema();
        let fields: Vec<Arc<Type>> = schema
            .get_fields()
            .iter()
            .filter(|f| [opts.text_field.as_str(), "url", "id"].contains(&f.name()))
            .cloned()
            .collect();
        if !fields.iter().any(|f| f.name() == opts.text_field) {
            let columns: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
            reader.pending = Some(drop(
                DropReason::MissingText,
                format!(
                    "no column {:?} in the file ({} rows skipped; columns: {}; see --text-field)",
                    opts.text_field,
                    meta.file_metadata().num_rows(),
                    columns.join(", ")
                ),
            ));
            return reader;
        }
        let projection = Type::group_type_builder(schema.name())
            .with_fields(fields)
            .build();
        let rows =
            projection.and_then(|p| RowIter::from_file_into(Box::new(parsed)).project(Some(p)));
        match rows {
            Ok(rows) => reader.rows = Some(rows),
            Err(e) => reader.pending = Some(drop(DropReason::UnreadableFile, e.to_string())),
        }
        reader
    }

    /// Compressed bytes of the row groups begun so far.
    pub fn bytes_consumed(&self) -> u64 {
        let (mut start, mut bytes) = (0, 0);
        for &(rows, size) in &self.groups {
            if start >= self.row {
                break;
            }
            bytes += size;
            start += rows;
        }
        bytes
    }

    fn drop_at(&self, reason: DropReason, row: u64, detail: impl Into<String>) -> Drop {
        Drop {
            reason,
            file: self.file.clone(),
            offset: row,
            detail: detail.into(),
        }
    }
}

impl Iterator for ParquetReader {
    type Item = Result<RawRecord, Drop>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(d) = self.pending.take() {
            return Some(Err(d));
        }
        let rows = self.rows.as_mut()?;
        let row = match rows.next()? {
            Ok(row) => row,
            Err(e) => {
                // A corrupt page ends the file: nothing after it can be located.
                self.rows = None;
                return Some(Err(self.drop_at(
                    DropReason::MalformedRecord,
                    self.row,
                    format!("{e} (the rest of the file is skipped)"),
                )));
            }
        };
        let n = self.row;
        self.row += 1;
        let (mut text, mut url, mut id) = (None, None, None);
        for (name, value) in row.get_column_iter() {
            let s = match value {
                Field::Str(s) => Some(s.clone()),
                Field::Bytes(b) => std::str::from_utf8(b.data()).ok().map(str::to_string),
                Field::Long(v) => Some(v.to_string()),
                Field::Int(v) => Some(v.to_string()),
                Field::ULong(v) => Some(v.to_string()),
                Field::UInt(v) => Some(v.to_string()),
                _ => None,
            };
            if name == &self.text_field {
                text = Some(s);
            } else if name == "url" {
                url = s;
            } else if name == "id" {
                id = s;
            }
        }
        let text = match text {
            Some(Some(t)) => t,
            Some(None) | None => {
                return Some(Err(self.drop_at(
                    DropReason::MissingText,
                    n,
                    format!("row {n}: {:?} is null or not a string", self.text_field),
                )))
            }
        };
        if text.len() as u64 > self.max_text {
            return Some(Err(self.drop_at(
                DropReason::PageTooLarge,
                n,
                format!(
                    "{}-byte text, over the {}-byte limit",
                    text.len(),
                    self.max_text
                ),
            )));
        }
        Some(Ok(RawRecord {
            url: url.unwrap_or_default(),
            record_id: id.unwrap_or_else(|| derived_id(&self.file, n)),
            origin: Origin {
                file: self.file.clone(),
                offset: n,
            },
            body: Body::Text(text),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::path::PathBuf;

    fn data(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    fn read(name: &str, field: &str) -> (Vec<Result<RawRecord, Drop>>, u64) {
        let opts = ReadOptions {
            text_field: field.to_string(),
            ..ReadOptions::default()
        };
        let file = File::open(data(name)).expect("fixture");
        let mut r = ParquetReader::new(file, name, &opts);
        let items: Vec<_> = r.by_ref().collect();
        (items, r.bytes_consumed())
    }

    /// The text pyarrow wrote in row `i` (tests/data/*.parquet, FineWeb's columns, written by
    /// pyarrow 26 in row groups of 20 with snappy, and of 32 with zstd).
    fn text(i: usize) -> String {
        format!(
            "Passage {i}: the quick brown fox {}over the lazy dog.",
            "jumps ".repeat(i % 7)
        )
    }

    #[test]
    fn fineweb_shaped_rows_become_records_and_a_null_text_is_counted() {
        let (items, consumed) = read("fineweb-sample.parquet", "text");
        assert_eq!(items.len(), 50);
        for (i, item) in items.iter().enumerate() {
            if i == 17 {
                let d = item.as_ref().expect_err("null text");
                assert_eq!((d.reason, d.offset), (DropReason::MissingText, 17));
                continue;
            }
            let r = item.as_ref().expect("record");
            assert_eq!(r.body, Body::Text(text(i)));
            assert_eq!(r.url, format!("https://example.org/page/{i}"));
            assert_eq!(r.record_id, format!("<urn:uuid:{i:08}>"));
            assert_eq!(r.origin.offset, i as u64);
        }
        let size = std::fs::metadata(data("fineweb-sample.parquet"))
            .expect("size")
            .len();
        assert!(consumed > 0 && consumed < size, "{consumed} of {size}");
    }

    #[test]
    fn another_text_column_and_zstd_pages() {
        let (items, _) = read("content-zstd.parquet", "content");
        let texts: Vec<_> = items.iter().filter_map(|i| i.as_ref().ok()).collect();
        assert_eq!(texts.len(), 49);
        assert_eq!(texts[20].body, Body::Text(text(21)));
        // Without --text-field the file has no text: one drop that says which columns it has.
        let (items, _) = read("content-zstd.parquet", "text");
        assert_eq!(items.len(), 1);
        let d = items[0].as_ref().expect_err("no column");
        assert_eq!(d.reason, DropReason::MissingText);
        assert!(d.detail.contains("content"), "{}", d.detail);
    }

    #[test]
    fn a_cut_or_foreign_file_is_one_drop() {
        let dir = tempfile::tempdir().expect("tmp");
        let bytes = std::fs::read(data("fineweb-sample.parquet")).expect("fixture");
        let cut = dir.path().join("cut.parquet");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
        let mut r = ParquetReader::new(
            File::open(&cut).expect("open"),
            "cut",
            &ReadOptions::default(),
        );
        let d = r.next().expect("one item").expect_err("cut file");
        assert_eq!(d.reason, DropReason::UnreadableFile);
        assert!(r.next().is_none());
    }
}
