package verifier

import (
	"bytes"
	"errors"
	"testing"

	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/tpm"
)

// Refusals must come as one of the sentinel errors, never as a panic.
var sentinels = []error{ErrEKUntrusted, ErrEKNotAllowed, ErrEKMismatch, ErrEKTemplate, ErrAKInvalid,
	ErrActivation, ErrNonce, ErrPCRSelection, ErrQuote, ErrPCRValues, ErrEventLog, ErrClock,
	ErrPCRPolicy, ErrKeyCertification, ErrMalformed}

func classified(err error) bool {
	for _, s := range sentinels {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

func FuzzBegin(f *testing.F) {
	fg := newForge(f)
	id := fg.identity()
	f.Add(id.EKPublic, id.EKCertificate, id.AK.Public, id.AK.CreateData, id.AK.CreateAttestation, id.AK.CreateSignature)
	f.Add([]byte{}, []byte{}, []byte{}, []byte{}, []byte{}, []byte{})
	v := forgeVerifier(f, fg, nil)
	f.Fuzz(func(t *testing.T, ekPub, ekCert, akPub, createData, createAtt, createSig []byte) {
		_, _, err := v.Begin(t.Context(), tpm.Identity{
			EKPublic: ekPub, EKCertificate: ekCert,
			AK: tpm.AttestationKey{Public: akPub, CreateData: createData, CreateAttestation: createAtt, CreateSignature: createSig},
		})
		if err != nil && !classified(err) {
			t.Fatalf("unclassified error: %v", err)
		}
	})
}

func FuzzFinish(f *testing.F) {
	fg := newForge(f)
	v := forgeVerifier(f, fg, nil)
	nonce := bytes.Repeat([]byte{1}, 32)
	l, err := simulator.UEFIBootLog(simulator.BootOptions{SecureBoot: true})
	if err != nil {
		f.Fatal(err)
	}
	ev := fg.evidence(nonce)
	var pcrs []byte
	for _, p := range ev.PCRs {
		pcrs = append(pcrs, byte(p.Index))
		pcrs = append(pcrs, p.Digest...)
	}
	f.Add(ev.Quote.Attest, ev.Quote.Signature, pcrs, l.Bytes(), ev.Key.Public, ev.Key.CertifyInfo, ev.Key.Signature)
	f.Add([]byte{}, []byte{}, []byte{}, []byte{}, []byte{}, []byte{}, []byte{})
	id := fg.identity()
	f.Fuzz(func(t *testing.T, attest, sig, pcrBlob, log, keyPub, certInfo, keySig []byte) {
		s, _, err := v.Begin(t.Context(), id)
		if err != nil {
			t.Fatal(err)
		}
		// Activate the session with the forge's nonce, as the real one is
		// random and no fuzzed quote could carry it.
		s.mu.Lock()
		s.state, s.nonce = stateActivated, append([]byte(nil), nonce...)
		s.mu.Unlock()
		v.mu.Lock()
		v.nonces[string(nonce)] = v.now().Add(v.cfg.NonceTTL)
		v.mu.Unlock()
		var vals []tpm.PCR
		for len(pcrBlob) >= 33 {
			vals = append(vals, tpm.PCR{Index: int(pcrBlob[0]), Alg: "sha256", Digest: pcrBlob[1:33]})
			pcrBlob = pcrBlob[33:]
		}
		_, err = s.Finish(t.Context(), tpm.PlatformEvidence{
			Quote:    tpm.Quote{Attest: attest, Signature: sig},
			PCRs:     vals,
			EventLog: log,
			Key:      tpm.CertifiedKey{Public: keyPub, CertifyInfo: certInfo, Signature: keySig},
		}, &ClockInfo{})
		if err != nil && !classified(err) {
			t.Fatalf("unclassified error: %v", err)
		}
	})
}

func FuzzParseAllowList(f *testing.F) {
	f.Add([]byte("# c\n" + string(bytes.Repeat([]byte("ab"), 32)) + "\n"))
	f.Add([]byte("\x00\xff#\n\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		set, err := ParseAllowList(data)
		if err != nil {
			return
		}
		for h := range set {
			if checkHash(h) != nil || h != string(bytes.ToLower([]byte(h))) {
				t.Fatalf("accepted bad hash %q", h)
			}
		}
	})
}
