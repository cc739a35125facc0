//! One-time bootstrap tokens: how a local proxy proves its identity to the
//! issuer the first time, without ever seeing the CA key.
//!
//! `minimesh up` holds a random key it shares only with the issuer it
//! started. For every proxy it starts it mints `v1.<claims>.<mac>`: the
//! identity, an expiry and a nonce, authenticated with HMAC-SHA256. The
//! issuer accepts each token once, before it expires, for that identity only.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use minimesh_spiffe::SpiffeId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Environment variable that carries a proxy's bootstrap token.
pub const TOKEN_ENV: &str = "MINIMESH_BOOTSTRAP_TOKEN";
/// Environment variable that carries the issuer's bootstrap key (hex).
pub const KEY_ENV: &str = "MINIMESH_BOOTSTRAP_KEY";

/// Why a bootstrap token or key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not `v1.<claims>.<tag>` with readable claims.
    #[error("the bootstrap token is malformed")]
    Malformed,
    /// The signature was not made with this key (or the token was altered).
    #[error("the bootstrap token's signature does not match")]
    BadSignature,
    /// Past its expiry.
    #[error("the bootstrap token expired")]
    Expired,
    /// Used once already: a token is good for one certificate.
    #[error("the bootstrap token was already used")]
    Replayed,
    /// The key given is not 32 bytes in hex.
    #[error("the bootstrap key must be 64 hex digits")]
    BadKey,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    id: String,
    exp: u64,
    nonce: String,
}

/// The shared secret behind bootstrap tokens.
#[derive(Clone)]
pub struct BootstrapKey {
    key: ring::hmac::Key,
    hex: String,
}

impl std::fmt::Debug for BootstrapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootstrapKey(…)")
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl BootstrapKey {
    /// A new random key.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self::from_bytes(&bytes)
    }

    fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes),
            hex: bytes.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// The key from the hex text `to_hex` gave (as handed to the issuer in its environment).
    pub fn from_hex(hex: &str) -> Result<Self, TokenError> {
        let hex = hex.trim();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::BadKey);
        }
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| TokenError::BadKey)?;
        Ok(Self::from_bytes(&bytes))
    }

    /// The key as hex, to hand to the issuer.
    pub fn to_hex(&self) -> &str {
        &self.hex
    }

    /// A token for `id`, valid once within `ttl`.
    pub fn mint(&self, id: &SpiffeId, ttl: Duration) -> String {
        self.mint_expiring(id, now_secs().saturating_add(ttl.as_secs()))
    }

    fn mint_expiring(&self, id: &SpiffeId, exp: u64) -> String {
        let nonce: [u8; 16] = rand::random();
        let claims = Claims {
            id: id.to_string(),
            exp,
            nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
        };
        // Serialising a plain struct of strings and numbers cannot fail.
        let json = serde_json::to_vec(&claims).unwrap_or_default();
        let body = URL_SAFE_NO_PAD.encode(json);
        let tag = ring::hmac::sign(&self.key, body.as_bytes());
        format!("v1.{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }
}

/// Checks tokens and remembers the ones used until they expire.
#[derive(Debug)]
pub struct BootstrapVerifier {
    key: BootstrapKey,
    used: Mutex<HashMap<String, u64>>,
}

impl BootstrapVerifier {
    /// A verifier for tokens signed with `key`, none used yet.
    pub fn new(key: BootstrapKey) -> Self {
        Self {
            key,
            used: Mutex::new(HashMap::new()),
        }
    }

    /// The identity a token vouches for; the token is spent.
    pub fn verify(&self, token: &str) -> Result<SpiffeId, TokenError> {
        let rest = token.strip_prefix("v1.").ok_or(TokenError::Malformed)?;
        let (body, tag) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        ring::hmac::verify(&self.key.key, body.as_bytes(), &tag)
            .map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        let now = now_secs();
        if claims.exp < now {
            return Err(TokenError::Expired);
        }
        let id: SpiffeId = claims.id.parse().map_err(|_| TokenError::Malformed)?;
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.retain(|_, exp| *exp >= now);
        if used.insert(claims.nonce, claims.exp).is_some() {
            return Err(TokenError::Replayed);
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> SpiffeId {
        SpiffeId::new("minimesh.local", "default", name).unwrap()
    }

    #[test]
    fn a_token_vouches_once_for_its_identity() {
        let key = BootstrapKey::generate();
        let verifier = BootstrapVerifier::new(BootstrapKey::from_hex(key.to_hex()).unwrap());
        let token = key.mint(&id("order"), Duration::from_secs(60));
        assert_eq!(verifier.verify(&token), Ok(id("order")));
        assert_eq!(verifier.verify(&token), Err(TokenError::Replayed));
    }

    #[test]
    fn forged_tampered_and_expired_tokens_are_refused() {
        let key = BootstrapKey::generate();
        let verifier = BootstrapVerifier::new(key.clone());
        let other = BootstrapKey::generate();
        let forged = other.mint(&id("payment"), Duration::from_secs(60));
        assert_eq!(verifier.verify(&forged), Err(TokenError::BadSignature));
        // Claims swapped onto another token's signature.
        let good = key.mint(&id("order"), Duration::from_secs(60));
        let (_, good_tag) = good.rsplit_once('.').unwrap();
        let forged_body = forged.split('.').nth(1).unwrap();
        assert_eq!(
            verifier.verify(&format!("v1.{forged_body}.{good_tag}")),
            Err(TokenError::BadSignature)
        );
        let expired = key.mint_expiring(&id("order"), now_secs() - 1);
        assert_eq!(verifier.verify(&expired), Err(TokenError::Expired));
        for junk in ["", "v1.", "v1.a.b", "v2.x.y", "v1.%%%.%%%"] {
            assert!(verifier.verify(junk).is_err(), "{junk:?}");
        }
        assert_eq!(BootstrapKey::from_hex("zz").err(), Some(TokenError::BadKey));
    }
}
