//! Device credential mode (DESIGN.md 3.3): `POST /api/v1/device-credentials`
//! (RegisterDeviceCredential), `GET .../{clientId}` (GetDeviceCredential),
//! `POST .../{clientId}/refresh` (RefreshDeviceCredential) and `DELETE .../{clientId}`
//! (UnRegisterDeviceCredential).
//!
//! A credential binds one client id. Refresh keeps the `deviceAccessKeyId` and issues a new
//! secret; the old secret is refused from the moment the refresh answers, and live connections
//! that authenticated with it (or with an unregistered credential) end at once with
//! `tcpclean` reason `auth_revoked`.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use herald_auth::{DeviceCredential, Secret, now_ms};
use herald_store::{CredentialRecord, Op};
use serde::{Deserialize, Serialize};

use crate::AdminState;
use crate::error::ApiError;
use crate::input;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RegisterRequest {
    client_id: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Credential {
    client_id: String,
    device_access_key_id: String,
    device_access_key_secret: String,
    create_time: u64,
}

impl From<&DeviceCredential> for Credential {
    fn from(c: &DeviceCredential) -> Credential {
        Credential {
            client_id: c.client_id.clone(),
            device_access_key_id: c.key_id.clone(),
            device_access_key_secret: c.secret.expose().to_owned(),
            create_time: c.created_at_ms,
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Unregistered {
    unregistered: bool,
}

fn put(credential: &DeviceCredential) -> Op {
    Op::PutCredential {
        client_id: credential.client_id.clone(),
        record: CredentialRecord {
            key_id: credential.key_id.clone(),
            secret: credential.secret.expose().to_owned(),
            created_at_ms: credential.created_at_ms,
        },
    }
}

fn new_secret() -> Secret {
    Secret::new(URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>()))
}

fn not_registered(client_id: &str) -> ApiError {
    ApiError::NotFound(format!("client {client_id:?} has no device credential"))
}

/// `POST /api/v1/device-credentials` with `{clientId}`; 409 when it has one already.
pub(crate) async fn register(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Credential>, ApiError> {
    let request: RegisterRequest = input::json_body(&headers, body)?;
    let client_id = state
        .auth
        .check_client_id(&request.client_id)
        .map_err(|e| ApiError::bad("clientId", e.to_string()))?;
    let credential = DeviceCredential {
        client_id: client_id.as_str().to_owned(),
        key_id: format!("DK{:024x}", rand::random::<u128>() >> 32),
        secret: new_secret(),
        created_at_ms: now_ms(),
    };
    let registry = state.auth.registry();
    // Added first, so that two concurrent registrations cannot both succeed; taken back if it
    // cannot be stored. Nobody can use it before this answers: its secret is not known yet.
    if !registry.insert_credential(credential.clone()) {
        return Err(ApiError::Conflict(format!(
            "client {:?} has a device credential already",
            credential.client_id
        )));
    }
    if let Err(e) = state.persist(vec![put(&credential)]).await {
        registry.remove_credential(&credential.client_id);
        return Err(e);
    }
    Ok(Json(Credential::from(&credential)))
}

/// `GET /api/v1/device-credentials/{clientId}`.
pub(crate) async fn get(
    State(state): State<Arc<AdminState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Credential>, ApiError> {
    let client_id = input::path_client_id(path)?;
    let credential = state
        .auth
        .registry()
        .credential_of_client(&client_id)
        .ok_or_else(|| not_registered(&client_id))?;
    Ok(Json(Credential::from(credential.as_ref())))
}

/// `POST /api/v1/device-credentials/{clientId}/refresh`: a new secret, same key id.
pub(crate) async fn refresh(
    State(state): State<Arc<AdminState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Credential>, ApiError> {
    let client_id = input::path_client_id(path)?;
    let registry = state.auth.registry();
    let old = registry
        .credential_of_client(&client_id)
        .ok_or_else(|| not_registered(&client_id))?;
    let credential = DeviceCredential {
        secret: new_secret(),
        ..old.as_ref().clone()
    };
    state.persist(vec![put(&credential)]).await?;
    registry.replace_credential(credential.clone());
    Ok(Json(Credential::from(&credential)))
}

/// `DELETE /api/v1/device-credentials/{clientId}`.
pub(crate) async fn unregister(
    State(state): State<Arc<AdminState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Unregistered>, ApiError> {
    let client_id = input::path_client_id(path)?;
    let registry = state.auth.registry();
    if registry.credential_of_client(&client_id).is_none() {
        return Err(not_registered(&client_id));
    }
    state
        .persist(vec![Op::DeleteCredential {
            client_id: client_id.clone(),
        }])
        .await?;
    registry.remove_credential(&client_id);
    Ok(Json(Unregistered { unregistered: true }))
}
