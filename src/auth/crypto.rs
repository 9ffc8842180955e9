//! `jsonwebtoken`'s cryptography on `ring`, the stack rustls already uses
//! here: one crypto library for TLS and tokens, and no second one (aws-lc)
//! to build. The crate parses tokens, picks keys and checks claims; this
//! file only binds its [`CryptoProvider`] interface to `ring`'s primitives.
//!
//! Verification takes the algorithm from the *key's* configuration, never
//! from the token alone: the factory refuses a key of another family (an
//! RSA public key is never used as an HMAC secret).

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature as sig;

/// The provider upgate installs once, at start (see [`install`]).
pub static RING: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    // Only needed to build JWKs from private keys, which upgate never does.
    key_utils: KeyUtils::new_unimplemented(),
};

/// Makes [`RING`] the process's provider (idempotent).
pub fn install() {
    let _ = RING.install_default();
}

struct RingVerifier {
    alg: Algorithm,
    key: DecodingKey,
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingVerifier {
        alg: *alg,
        key: key.clone(),
    }))
}

fn rsa_params(alg: Algorithm) -> Option<&'static sig::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

fn hmac_alg(alg: Algorithm) -> Option<ring::hmac::Algorithm> {
    Some(match alg {
        Algorithm::HS256 => ring::hmac::HMAC_SHA256,
        Algorithm::HS384 => ring::hmac::HMAC_SHA384,
        Algorithm::HS512 => ring::hmac::HMAC_SHA512,
        _ => return None,
    })
}

fn bad() -> signature::Error {
    signature::Error::new()
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        if let Some(params) = rsa_params(self.alg) {
            return match self.key.kind() {
                DecodingKeyKind::SecretOrDer(der) => sig::UnparsedPublicKey::new(params, der)
                    .verify(msg, signature)
                    .map_err(|_| bad()),
                DecodingKeyKind::RsaModulusExponent { n, e } => {
                    sig::RsaPublicKeyComponents { n, e }
                        .verify(params, msg, signature)
                        .map_err(|_| bad())
                }
            };
        }
        let bytes = self.key.try_get_as_bytes().map_err(|_| bad())?;
        if let Some(h) = hmac_alg(self.alg) {
            return ring::hmac::verify(&ring::hmac::Key::new(h, bytes), msg, signature)
                .map_err(|_| bad());
        }
        let alg: &dyn sig::VerificationAlgorithm = match self.alg {
            Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
            Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
            Algorithm::EdDSA => &sig::ED25519,
            _ => return Err(bad()),
        };
        sig::UnparsedPublicKey::new(alg, bytes)
            .verify(msg, signature)
            .map_err(|_| bad())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// Signing: for the demo's ready-made token and for tests.
struct RingSigner {
    alg: Algorithm,
    key: EncodingKey,
}

fn new_signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingSigner {
        alg: *alg,
        key: key.clone(),
    }))
}

impl Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let rng = SystemRandom::new();
        let der = self.key.as_bytes();
        if let Some(h) = hmac_alg(self.alg) {
            return Ok(ring::hmac::sign(&ring::hmac::Key::new(h, der), msg)
                .as_ref()
                .to_vec());
        }
        let rsa: Option<&'static dyn sig::RsaEncoding> = match self.alg {
            Algorithm::RS256 => Some(&sig::RSA_PKCS1_SHA256),
            Algorithm::RS384 => Some(&sig::RSA_PKCS1_SHA384),
            Algorithm::RS512 => Some(&sig::RSA_PKCS1_SHA512),
            Algorithm::PS256 => Some(&sig::RSA_PSS_SHA256),
            Algorithm::PS384 => Some(&sig::RSA_PSS_SHA384),
            Algorithm::PS512 => Some(&sig::RSA_PSS_SHA512),
            _ => None,
        };
        if let Some(enc) = rsa {
            let pair = sig::RsaKeyPair::from_der(der)
                .or_else(|_| sig::RsaKeyPair::from_pkcs8(der))
                .map_err(|_| bad())?;
            let mut out = vec![0; pair.public().modulus_len()];
            pair.sign(enc, &rng, msg, &mut out).map_err(|_| bad())?;
            return Ok(out);
        }
        match self.alg {
            Algorithm::ES256 | Algorithm::ES384 => {
                let a = if self.alg == Algorithm::ES256 {
                    &sig::ECDSA_P256_SHA256_FIXED_SIGNING
                } else {
                    &sig::ECDSA_P384_SHA384_FIXED_SIGNING
                };
                let pair = sig::EcdsaKeyPair::from_pkcs8(a, der, &rng).map_err(|_| bad())?;
                Ok(pair.sign(&rng, msg).map_err(|_| bad())?.as_ref().to_vec())
            }
            Algorithm::EdDSA => {
                let pair =
                    sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|_| bad())?;
                Ok(pair.sign(msg).as_ref().to_vec())
            }
            _ => Err(bad()),
        }
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}
