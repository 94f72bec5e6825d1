//! Request input, checked at the edge: query parameters, JSON bodies and client ids. Every
//! failure is a 4xx [`ApiError`] that names the parameter or field at fault.

use std::ops::RangeInclusive;

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use crate::error::ApiError;

/// The longest client id there can be (an MQTT string holds at most 65,535 bytes).
const MAX_CLIENT_ID_BYTES: usize = 65_535;

/// Checks a client id given as `field`: non-empty and not longer than any MQTT client id.
pub(crate) fn client_id(field: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::bad(field, "must not be empty"));
    }
    if id.len() > MAX_CLIENT_ID_BYTES {
        return Err(ApiError::bad(
            field,
            format!(
                "{} bytes, over the limit of {MAX_CLIENT_ID_BYTES}",
                id.len()
            ),
        ));
    }
    Ok(())
}

/// The `{clientId}` of the path, checked.
pub(crate) fn path_client_id(
    path: Result<Path<String>, PathRejection>,
) -> Result<String, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::bad("clientId", e.body_text()))?;
    client_id("clientId", &id)?;
    Ok(id)
}

/// The query parameters of a request, each known and given at most once. An empty value
/// (`?group=`) counts as not given.
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(
        query: Result<Query<Vec<(String, String)>>, QueryRejection>,
        allowed: &[&str],
    ) -> Result<Params, ApiError> {
        let Query(pairs) = query.map_err(|e| ApiError::bad("query", e.body_text()))?;
        for (i, (name, _)) in pairs.iter().enumerate() {
            if !allowed.contains(&name.as_str()) {
                return Err(ApiError::bad(
                    name.clone(),
                    format!("unknown parameter; expected one of {}", allowed.join(", ")),
                ));
            }
            if pairs[..i].iter().any(|(earlier, _)| earlier == name) {
                return Err(ApiError::bad(name.clone(), "given more than once"));
            }
        }
        Ok(Params(pairs))
    }

    /// The value of `name`, unless absent or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// A whole number in `range`, or `default` when not given.
    pub fn number(
        &self,
        name: &str,
        range: RangeInclusive<u64>,
        default: u64,
    ) -> Result<u64, ApiError> {
        let Some(text) = self.get(name) else {
            return Ok(default);
        };
        let out_of_range = || {
            ApiError::bad(
                name,
                format!(
                    "expected a whole number from {} to {}, got {text:?}",
                    range.start(),
                    range.end()
                ),
            )
        };
        let value: u64 = text.parse().map_err(|_| out_of_range())?;
        if !range.contains(&value) {
            return Err(out_of_range());
        }
        Ok(value)
    }

    /// A time in ms since the Unix epoch, or `default` when not given.
    pub fn millis(&self, name: &str, default: u64) -> Result<u64, ApiError> {
        let Some(text) = self.get(name) else {
            return Ok(default);
        };
        text.parse().map_err(|_| {
            ApiError::bad(
                name,
                format!("expected a time in ms since the Unix epoch, got {text:?}"),
            )
        })
    }

    /// `true` or `false`, or `None` when not given.
    pub fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(other) => Err(ApiError::bad(
                name,
                format!("expected true or false, got {other:?}"),
            )),
        }
    }
}

/// Parses a JSON body. The request must say `Content-Type: application/json` (which a
/// cross-site form cannot send without a CORS preflight).
pub(crate) fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(BODY_LIMIT),
        _ => ApiError::bad("body", e.body_text()),
    })?;
    // An object first: serde would also read a struct from a JSON array.
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&body)
        .map_err(|e| match e.classify() {
            Category::Data => ApiError::bad("body", format!("expected a JSON object: {e}")),
            _ => ApiError::bad("body", format!("not valid JSON: {e}")),
        })?;
    let value: T =
        serde_path_to_error::deserialize(serde_json::Value::Object(object)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path != "." {
                return ApiError::bad(path, inner);
            }
            match missing_field(&inner) {
                Some(field) => ApiError::bad(field, "missing"),
                None => ApiError::bad("body", inner),
            }
        })?;
    Ok(value)
}

/// The field of serde's "missing field `topic`" message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// The body limit of the admin API (axum's default).
pub(crate) const BODY_LIMIT: usize = 2 * 1024 * 1024;

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}
