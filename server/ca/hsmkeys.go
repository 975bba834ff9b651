package ca

import (
	"context"
	"fmt"

	"github.com/ironroot/ironroot/hsm"
)

// HSMKeyStore returns the KeyStore of a PKCS#11 token; token is its label,
// recorded in every KeyRef so the journal says where each key lives.
func HSMKeyStore(h *hsm.HSM, token string) KeyStore {
	return &hsmKeyStore{h: h, token: token}
}

type hsmKeyStore struct {
	h     *hsm.HSM
	token string
}

type hsmKey struct {
	*hsm.Key
	token string
}

func (k hsmKey) Ref() KeyRef {
	r := k.Key.Ref()
	return KeyRef{Token: k.token, ID: r.ID, Label: r.Label}
}

func (s *hsmKeyStore) GenerateKey(ctx context.Context, keyType, label string) (Key, error) {
	t, err := hsm.ParseKeyType(keyType)
	if err != nil {
		return nil, err
	}
	k, err := s.h.GenerateKey(ctx, t, label)
	if err != nil {
		return nil, err
	}
	return hsmKey{Key: k, token: s.token}, nil
}

func (s *hsmKeyStore) FindKey(ctx context.Context, ref KeyRef) (Key, error) {
	if ref.Token != "" && s.token != "" && ref.Token != s.token {
		return nil, fmt.Errorf("the key is on token %q but the configured HSM URI names token %q", ref.Token, s.token)
	}
	k, err := s.h.FindKey(ctx, hsm.KeyRef{ID: ref.ID, Label: ref.Label})
	if err != nil {
		return nil, err
	}
	return hsmKey{Key: k, token: s.token}, nil
}

func (s *hsmKeyStore) DestroyKey(ctx context.Context, ref KeyRef) error {
	return s.h.DestroyKey(ctx, hsm.KeyRef{ID: ref.ID, Label: ref.Label})
}
