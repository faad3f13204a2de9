"""scikit-learn's own estimator contract suite over every estimator of the analysis families."""

import warnings

from sklearn.utils.estimator_checks import parametrize_with_checks

from neuronmap.analysis.clustering import AutoKMeans, KneeDBSCAN
from neuronmap.analysis.dimensionality import CovariancePCA, LevinaBickelMLE, TwoNN


@parametrize_with_checks([TwoNN(), LevinaBickelMLE(k1=3, k2=5), AutoKMeans(k_max=4), KneeDBSCAN(), CovariancePCA()])
def test_sklearn_estimator_contract(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate rows dropped: the checks feed tiny repeated data
        check(estimator)
