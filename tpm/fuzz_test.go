package tpm

import (
	"bytes"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// FuzzCertFromNV feeds arbitrary NV contents to the EK certificate
// unwrapper: it must never panic, and what it returns is a DER SEQUENCE
// found in its input.
func FuzzCertFromNV(f *testing.F) {
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x01})
	f.Add([]byte{0x10, 0x01, 0x00, 0x05, 0x30, 0x03, 0x02, 0x01, 0x01, 0xff, 0xff})
	f.Add([]byte{0x30, 0x82, 0x01, 0x00})
	f.Add([]byte{0x30, 0x80, 0x00, 0x00})
	f.Add([]byte{0x10, 0x01, 0xff, 0xff, 0x30})
	f.Fuzz(func(t *testing.T, b []byte) {
		der, err := certFromNV(b)
		if err != nil {
			return
		}
		if len(der) < 2 || der[0] != 0x30 || !bytes.Contains(b, der) {
			t.Fatalf("certFromNV(%x) = %x: not a SEQUENCE from the input", b, der)
		}
		if n, err := derLength(der); err != nil || n != len(der) {
			t.Fatalf("result %x is not one whole SEQUENCE: %d, %v", der, n, err)
		}
	})
}

// FuzzParseKeyBlob feeds arbitrary bytes to the key blob decoder (the blob
// is read from disk at start-up): no panic, and whatever it accepts is a
// P-256 signing key.
func FuzzParseKeyBlob(f *testing.F) {
	good := append([]byte(keyBlobMagic), tpm2.Marshal(tpm2.New2B(keyTemplate()))...)
	good = append(good, 0, 4, 1, 2, 3, 4)
	f.Add(good)
	f.Add([]byte(keyBlobMagic))
	f.Add(append([]byte(keyBlobMagic), 0xff, 0xff))
	f.Add([]byte("IRK\x01\x00\x02\x00\x23\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		pub, _, err := parseKeyBlob(b)
		if err != nil {
			return
		}
		area, err := pub.Contents()
		if err != nil {
			t.Fatalf("accepted blob with undecodable public area: %v", err)
		}
		if area.Type != tpm2.TPMAlgECC || area.ObjectAttributes.Restricted || !area.ObjectAttributes.SignEncrypt {
			t.Fatalf("accepted a blob that is not an unrestricted ECC signing key")
		}
		_, _ = ecdsaPublic(&pub)
	})
}

// FuzzResponseSize checks the socket transport's header validation.
func FuzzResponseSize(f *testing.F) {
	f.Add([]byte{0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0, 0})
	f.Add([]byte{0x80, 0x01, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, hdr []byte) {
		n, err := responseSize(hdr)
		if err == nil && (n < responseHeaderSize || n > maxResponseSize) {
			t.Fatalf("responseSize(%x) = %d accepted", hdr, n)
		}
	})
}
