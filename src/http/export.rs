//! Exports of the merchant's orders as CSV or NDJSON, streamed page by page: the
//! answer is written while the orders are read, one page (at most
//! [`EXPORT_PAGE`] orders) in memory at a time, whatever the export's size. A
//! failure after the first byte cuts the stream (the chunked body never ends
//! cleanly), so a partial export is never taken for a whole one.

use std::borrow::Cow;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::actors::shard::OrderSnapshot;
use crate::core::{Kami, OrderPosition, OrderQuery};

/// Orders read per page of an export.
pub const EXPORT_PAGE: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Ndjson,
}

const CSV_HEADER: &str =
    "order_id,product_id,status,buyer,quantity,amount_cents,created_at,expires_at,paid_at,delivered_at,closed_at,payment_id,amount_mismatch,group_id,reseller,coupon,discount_cents";

/// One CSV cell: quoted when it holds a comma, a quote or a line break (quotes
/// doubled, RFC 4180), and prefixed with `'` when a spreadsheet would read it as a
/// formula (it starts with `=`, `+`, `-`, `@`, a tab or a carriage return).
pub fn csv_cell(s: &str) -> Cow<'_, str> {
    let formula = s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let quote = s.contains([',', '"', '\n', '\r']);
    if !formula && !quote {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 4);
    if quote {
        out.push('"');
    }
    if formula {
        out.push('\'');
    }
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    if quote {
        out.push('"');
    }
    Cow::Owned(out)
}

fn csv_row(o: &OrderSnapshot, include_keys: bool, out: &mut String) {
    use std::fmt::Write;
    let ts = |ms: Option<u64>| ms.map(super::views::ts).unwrap_or_default();
    let order = &o.order;
    let price = o.breakdown();
    let _ = write!(
        out,
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        csv_cell(&o.order_id()),
        csv_cell(&o.product_id),
        order.status.as_str(),
        csv_cell(&order.buyer),
        order.quantity,
        order.amount_cents,
        ts(Some(order.created_at_ms)),
        ts(Some(order.expires_at_ms)),
        ts(order.paid_at_ms),
        ts(order.delivered_at_ms),
        ts(order.closed_at_ms),
        csv_cell(order.payment_id.as_deref().unwrap_or("")),
        order.amount_mismatch,
        csv_cell(&o.group_id().unwrap_or_default()),
        csv_cell(price.reseller.unwrap_or_default()),
        csv_cell(price.coupon.unwrap_or_default()),
        price.discount_cents,
    );
    if include_keys {
        out.push(',');
        out.push_str(&csv_cell(&o.keys.join("\n")));
    }
    out.push_str("\r\n");
}

/// The streamed answer of an export.
pub fn response(core: Arc<Kami>, query: OrderQuery, format: Format, include_keys: bool) -> Response {
    struct Walk {
        next: Option<Option<OrderPosition>>,
        header: bool,
    }
    let start = Walk { next: Some(None), header: format == Format::Csv };
    let stream = futures::stream::unfold(start, move |mut walk| {
        let (core, query) = (core.clone(), query.clone());
        async move {
            if walk.header {
                walk.header = false;
                let mut line = CSV_HEADER.to_string();
                if include_keys {
                    line.push_str(",keys");
                }
                line.push_str("\r\n");
                return Some((Ok(Bytes::from(line)), walk));
            }
            let after = walk.next.take()?;
            match core.list_orders(&query, after.as_ref(), EXPORT_PAGE).await {
                Ok(page) => {
                    let mut chunk = String::new();
                    for o in &page.orders {
                        match format {
                            Format::Csv => csv_row(o, include_keys, &mut chunk),
                            Format::Ndjson => {
                                chunk.push_str(&super::views::listed_order(o, include_keys).to_string());
                                chunk.push('\n');
                            }
                        }
                    }
                    walk.next = page.next.map(Some);
                    Some((Ok(Bytes::from(chunk)), walk))
                }
                Err(e) => {
                    tracing::error!(error = %e, "order export cut short");
                    Some((Err(std::io::Error::other(e.to_string())), walk))
                }
            }
        }
    });
    let (content_type, name) = match format {
        Format::Csv => ("text/csv; charset=utf-8", "attachment; filename=\"orders.csv\""),
        Format::Ndjson => ("application/x-ndjson", "attachment; filename=\"orders.ndjson\""),
    };
    let mut r = (StatusCode::OK, Body::from_stream(stream)).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CONTENT_DISPOSITION, HeaderValue::from_static(name));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_quoted_and_formulas_neutralised() {
        assert_eq!(csv_cell("plain-key_1"), "plain-key_1");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        for f in ["+1", "-1", "@SUM(A1)", "=1+1", "\tx"] {
            assert!(csv_cell(f).trim_start_matches('"').starts_with('\''), "{f}");
        }
        assert_eq!(csv_cell(""), "");
    }
}
