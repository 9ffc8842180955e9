//! Signing keys and tokens made in the test: EC (P-256, P-384) and Ed25519
//! keys are generated here; the RSA key is a fixed test-only key
//! (`tests/keys/`, generated with `openssl genpkey`), because ring cannot
//! generate RSA keys.

use std::path::{Path, PathBuf};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// A private key (to sign) and its public PEM (for upgate).
pub struct SigningKey {
    pub alg: Algorithm,
    pub private: EncodingKey,
    pub public_pem: String,
    /// The raw public key (EC point or Ed25519 bytes), for JWKs.
    pub public_raw: Vec<u8>,
}

impl SigningKey {
    pub fn generate(alg: Algorithm) -> SigningKey {
        upgate::auth::crypto::install();
        let (rc, alg) = match alg {
            Algorithm::ES256 => (&rcgen::PKCS_ECDSA_P256_SHA256, alg),
            Algorithm::ES384 => (&rcgen::PKCS_ECDSA_P384_SHA384, alg),
            Algorithm::EdDSA => (&rcgen::PKCS_ED25519, alg),
            Algorithm::RS256 | Algorithm::PS256 => return SigningKey::rsa(alg),
            other => panic!("no test key for {other:?}"),
        };
        let kp = rcgen::KeyPair::generate_for(rc).expect("keygen");
        let private = if alg == Algorithm::EdDSA {
            EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes())
        } else {
            EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes())
        }
        .expect("encoding key");
        SigningKey {
            alg,
            private,
            public_pem: kp.public_key_pem(),
            public_raw: kp.public_key_raw().to_vec(),
        }
    }

    fn rsa(alg: Algorithm) -> SigningKey {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
        let private = std::fs::read(dir.join("rsa-test-private.pem")).expect("rsa key");
        SigningKey {
            alg,
            private: EncodingKey::from_rsa_pem(&private).expect("rsa encoding key"),
            public_pem: std::fs::read_to_string(dir.join("rsa-test-public.pem")).expect("rsa pub"),
            public_raw: Vec::new(),
        }
    }

    /// Writes the public PEM into `dir`; its path.
    pub fn write_public(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.public_pem).expect("write key");
        p
    }

    /// A token with these claims, and `kid` in its header.
    pub fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, claims, &self.private).expect("sign")
    }

    /// This key as a JWK (EC or Ed25519), with `kid`.
    pub fn jwk(&self, kid: &str) -> Value {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        match self.alg {
            Algorithm::EdDSA => {
                json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(&self.public_raw)})
            }
            Algorithm::ES256 | Algorithm::ES384 => {
                let n = (self.public_raw.len() - 1) / 2;
                let crv = if n == 32 { "P-256" } else { "P-384" };
                json!({"kty": "EC", "crv": crv, "kid": kid, "use": "sig",
                       "x": b64(&self.public_raw[1..1 + n]), "y": b64(&self.public_raw[1 + n..])})
            }
            other => panic!("no JWK for {other:?}"),
        }
    }
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Claims valid for an hour: `sub`, `iss`, `aud` as given.
pub fn claims(sub: &str, iss: &str, aud: &str) -> Value {
    json!({"sub": sub, "iss": iss, "aud": aud, "exp": now() + 3600, "iat": now()})
}

/// A token signed with an HMAC secret.
pub fn hmac_token(secret: &[u8], alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    upgate::auth::crypto::install();
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(
        &h,
        claims,
        &EncodingKey::from_secret(secret).expect("secret"),
    )
    .expect("sign")
}

/// `{"alg":"none"}` with these claims and an empty signature.
pub fn unsigned_token(claims: &Value) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}
